"""The Llama-family decoder shared by the trainer, `generate` and the engine.

Parameter names follow HF transformers (`model.layers.0.self_attn.q_proj.weight`, ...) so checkpoints, PEFT
adapters and exports map one to one. The model takes explicit inputs: token ids, their positions and, when
generating, a KV cache; cache policy lives with the caller.

The forwards here are the plain maths: per layer h = x + attention(norm(x)); out = h + mlp(norm(h)), the MLP a
dense SwiGLU or, in a mixture-of-experts model's sparse layers, models/sparse_moe.py's block. The variants
live beside them, each in the file named after it, and are chosen once, not tested throughout the forward:
- models/recompute.py: activation recompute (`set_recompute` picks, per layer, how the trainer runs it);
- models/offload.py: the "offloaded" policy's layer inputs in pinned host memory;
- models/tiling.py: RMSNorm and the MLP over tiles of tokens in long-sequence training (`set_tiling`);
- models/inference.py: the same maths without autograd, with fused residual adds and projections
  (`fuse_projections`), which every generation and serving step runs.
Which kernel an op runs (fused Triton or eager PyTorch) is models/fused.py's rule.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from longseq.attention import attention
from longseq.config import ModelConfig
from longseq.config.policy import PLAIN_LAYER_POLICIES, RECOMPUTE_POLICIES
from longseq.models import fused, inference, recompute, tiling
from longseq.models.fused_linear import FusedLinear
from longseq.models.offload import LayerInputOffloader
from longseq.models.rope import RotaryEmbedding, apply_rope
from longseq.models.sparse_moe import SparseMoeBlock

if TYPE_CHECKING:
    from longseq.generation.kv_cache import KVCache  # or the engine's PagedKVCache: same `attention` method


class RMSNorm(nn.Module):
    # Zhang & Sennrich 2019 (arXiv 1910.07467); normalise in float32, scale in the input dtype (as HF Llama).
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.tile: int | None = None  # set_tiling: long training sequences in tiles of rows (models/tiling.py)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fused.active(x):  # one Triton pass; saves x and a float32 rstd per row, as the tiled norm does
            return fused.rms_norm(x, self.weight, self.eps)
        if self.tile is not None and torch.is_grad_enabled() and x.numel() // x.shape[-1] > self.tile:
            return tiling.tiled_rms_norm(x, self.weight, self.eps, self.tile)  # no fp32 copy of x kept
        dtype = x.dtype
        x = x.to(torch.promote_types(dtype, torch.float32))  # fp32 maths (float64 stays float64, for tests)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.window = cfg.layer_window(layer_idx)
        self.variant = cfg.attention  # masks beyond the window, ALiBi, chunked compute (models/overrides.py sets it)
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=cfg.o_bias)
        if cfg.qk_norm:  # Qwen3: per-head RMSNorm on q and k before RoPE
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None
        self.sequence_parallel = None  # distributed.ulysses.UlyssesAttention when the sequence is split over GPUs
        # fuse_projections (models/inference.py): q/k/v as one matmul and o_proj as inference runs them
        self.qkv: FusedLinear | None = None
        self.o: FusedLinear | None = None

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: KVCache | None = None,
        doc_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (B, S, d) -> (B, S, d): project to heads, position (RoPE), attend, project back."""
        q, k, v = self.project(x)
        q, k, v = self.position(q, k, v, cos, sin)
        return self.output(self.attend(q, k, v, cache, doc_ids))

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, S, d) -> q (B, S, H, D), k and v (B, S, H_kv, D)."""
        return self.heads(self.q_proj(x), self.k_proj(x), self.v_proj(x))

    def heads(self, q, k, v) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Projections q (B, S, H·D), k/v (B, S, H_kv·D) -> views (B, S, H, D), (B, S, H_kv, D)."""
        B, S, _ = q.shape
        q = q.view(B, S, self.num_heads, self.head_dim)
        k = k.view(B, S, self.num_kv_heads, self.head_dim)
        v = v.view(B, S, self.num_kv_heads, self.head_dim)
        return q, k, v

    def position(self, q, k, v, cos, sin) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q (B, S, H, D), k/v (B, S, H_kv, D) -> (B, H, S, D) each: q/k norms (Qwen3) and RoPE applied."""
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        rope = not self.variant.alibi  # ALiBi replaces position embeddings (Press et al. 2021)
        if rope and fused.active(q):  # one kernel for q and k, in their (B, S, H, D) layout
            q, k = fused.rope(q, k, cos, sin)
            rope = False
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, S, D)
        if rope:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return q, k, v

    def attend(self, q, k, v, cache=None, doc_ids=None) -> torch.Tensor:
        """q (B, H, S, D), k/v (B, H_kv, S, D) -> attention output (B, H, S, D)."""
        if cache is not None:  # the cache stores this step's K/V and attends over everything it holds
            return cache.attention(self.layer_idx, q, k, v, self.window)
        if self.sequence_parallel is not None:  # Ulysses: all-to-all to whole-sequence heads and back
            return self.sequence_parallel(q, k, v, window=self.window, doc_ids=doc_ids)
        return attention(q, k, v, window=self.window, doc_ids=doc_ids, variant=self.variant)

    def output(self, out: torch.Tensor) -> torch.Tensor:
        """Attention output (B, H, S, D) -> o_proj (B, S, d)."""
        return self.o_proj(self.merge_heads(out))

    def merge_heads(self, out: torch.Tensor) -> torch.Tensor:
        """(B, H, S, D) -> (B, S, H·D)."""
        B, _, S, _ = out.shape
        return out.transpose(1, 2).reshape(B, S, self.num_heads * self.head_dim)


class MLP(nn.Module):
    # SwiGLU (Shazeer 2020, arXiv 2002.05202): down(silu(gate(x)) * up(x)).
    def __init__(self, cfg: ModelConfig, intermediate_size: int | None = None):
        """`intermediate_size`: the width when not cfg.intermediate_size (SharedExpert)."""
        super().__init__()
        width = intermediate_size or cfg.intermediate_size
        self.gate_proj = nn.Linear(cfg.hidden_size, width, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, width, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(width, cfg.hidden_size, bias=cfg.mlp_bias)
        self.tile: int | None = None  # set_tiling: long training sequences in tiles of tokens (models/tiling.py)
        self.recompute_act = False  # set_recompute: backward recomputes silu(gate)·up (models/recompute.py)
        # fuse_projections (models/inference.py): gate and up as one matmul, down_proj as inference runs it
        self.gate_up: FusedLinear | None = None
        self.down: FusedLinear | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, S, d) -> (B, S, d)."""
        if self.tile is not None and torch.is_grad_enabled() and x.numel() // x.shape[-1] > self.tile:
            return tiling.mlp(self, x)  # this forward, a tile of tokens at a time
        gate, up = self.gate_proj(x), self.up_proj(x)
        if self.recompute_act and torch.is_grad_enabled():
            return recompute.swiglu_output(self, gate, up)  # the same maths, silu(gate)·up not kept for backward
        return self.output(self.swiglu(gate, up))

    @staticmethod
    def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up (B, S, I)."""
        if fused.active(gate) and gate.shape == up.shape:  # keeps gate and up, not silu(gate) as well
            return fused.swiglu(gate, up)
        return F.silu(gate) * up

    def output(self, act: torch.Tensor) -> torch.Tensor:
        """silu(gate)·up (B, S, I) -> down_proj (B, S, d). The MLP's output only ever feeds the residual add that
        ends the layer, whose backward reads no values, so a checkpoint's recompute may skip the frozen down_proj
        (models/recompute.py)."""
        with recompute.output_unused():
            return self.down_proj(act)


class SharedExpert(MLP):
    """Qwen2-MoE's always-on expert: a SwiGLU MLP whose output a sigmoid gate scales (models/sparse_moe.py). That
    gate's backward reads the output, so unlike a layer's MLP it is always computed, in a recompute too: the
    shortcuts for an output that only feeds the residual add (MLP.output, tiling.mlp) are not taken."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (T, d) -> (T, d)."""
        if self.tile is not None and torch.is_grad_enabled() and x.numel() // x.shape[-1] > self.tile:
            params = [p for p in self.parameters() if p.requires_grad]
            return tiling.tiled_mlp(self.plain, x, params, self.tile)
        return self.plain(x)

    def plain(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.swiglu(self.gate_proj(x), self.up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = sparse_mlp(cfg) if cfg.layer_sparse(layer_idx) else MLP(cfg)
        # set_recompute: this layer's maths spelt with checkpoints inside it (recompute.selective or
        # recompute.keep_attention), run in training; None: the plain forward below.
        self.recompute = None

    def forward(self, x, cos, sin, cache=None, doc_ids=None):
        """x (B, S, d) -> (B, S, d)."""
        # Recompute is for training; a cache means generation, where attention writes K/V and must run once.
        if self.recompute is not None and cache is None and torch.is_grad_enabled():
            return self.recompute(self, x, cos, sin, doc_ids)
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, doc_ids)
        return h + self.mlp(self.post_attention_layernorm(h))


def sparse_mlp(cfg: ModelConfig) -> SparseMoeBlock:
    """A sparse layer's mixture of experts, with Qwen2-MoE's shared expert where the config has one."""
    width = cfg.shared_expert_intermediate_size
    return SparseMoeBlock(cfg, SharedExpert(cfg, width) if width else None)


class Decoder(nn.Module):
    """Embeddings, layers and final norm: HF's `model.` prefix."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


def _call(layer: DecoderLayer, x, cos, sin, doc_ids):
    """A layer in a training forward, under no checkpoint around it (set_recompute's default)."""
    return layer(x, cos, sin, None, doc_ids)


class CausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Decoder(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rotary = RotaryEmbedding(cfg.rope, cfg.head_dim)
        self.offloader: LayerInputOffloader | None = None  # recompute "offloaded" (models/offload.py)
        self.head: FusedLinear | None = None  # lm_head as inference runs it (fuse_projections)
        self.set_recompute("none")
        self.tie_weights()

    def set_recompute(self, policy: str, keep_on_gpu: int = 0, plain_layers: int = 0,
                      attention_layers: int = 0) -> None:
        """Activation checkpointing: none; selective (recompute attention internals and the SwiGLU product,
        keep every matmul output, after Korthikanti et al. 2022); keep_attention (recompute everything but
        attention, whose inputs and output stay: the long-sequence inverse of selective); full (keep only each
        layer's input); offloaded (full, with the inputs of all but the last `keep_on_gpu` layers in pinned host
        memory). Under keep_attention or full, the last `plain_layers` layers recompute nothing but the SwiGLU
        product: what memory is left over buys back recompute layer by layer. Under full, the `attention_layers`
        layers below those recompute as keep_attention: at long sequences, where attention's quadratic forward is
        most of a recompute, each buys back the most time per byte.

        Chosen here once per layer (models/recompute.py spells each policy out): how `hidden` runs the layer
        (called, checkpointed whole or offloaded: `layer_runs`), the checkpoints inside it (`layer.recompute`) and
        whether its MLP recomputes the SwiGLU product (`layer.mlp.recompute_act`)."""
        if policy not in RECOMPUTE_POLICIES:
            raise ValueError(f"recompute policy must be one of {RECOMPUTE_POLICIES}, got {policy!r}")
        num_layers = len(self.model.layers)
        if plain_layers and (policy not in PLAIN_LAYER_POLICIES or not 0 <= plain_layers <= num_layers):
            raise ValueError(f"plain_layers needs recompute keep_attention or full and 0..{num_layers} layers, got "
                             f"{plain_layers} with {policy!r}")
        if attention_layers and (policy != "full" or not 0 <= attention_layers <= num_layers - plain_layers):
            raise ValueError(f"attention_layers needs recompute full and 0..{num_layers - plain_layers} layers, got "
                             f"{attention_layers} with {policy!r}")
        self.recompute, self.offload_keep, self.plain_layers = policy, max(0, keep_on_gpu), plain_layers
        self.attention_layers = attention_layers
        if policy == "offloaded" and self.offloader is None:
            self.offloader = LayerInputOffloader()
        offloaded = num_layers - self.offload_keep if policy == "offloaded" else 0  # the first layers' inputs
        inside = {"selective": recompute.selective, "keep_attention": recompute.keep_attention}.get(policy)
        self.layer_runs = []  # per layer: how a training forward (`hidden` without a cache) runs it
        for i, layer in enumerate(self.model.layers):
            plain = i >= num_layers - plain_layers  # keep_attention / full's last layers: only the SwiGLU product
            kept = not plain and i >= num_layers - plain_layers - attention_layers  # full's layers below those
            layer.recompute = None if plain else recompute.keep_attention if kept else inside
            layer.mlp.recompute_act = policy == "selective" or plain
            if i < offloaded:
                self.layer_runs.append(self.offloader.layer)
            elif policy in ("full", "offloaded") and not plain and not kept:
                self.layer_runs.append(recompute.whole_layer)
            else:
                self.layer_runs.append(_call)

    def reserve_offload(self, batch: int, seq_len: int) -> None:
        """Recompute offloaded: allocate (page-lock) the host buffers of the offloaded layer inputs now, for
        micro-batches of (batch, seq_len) tokens, instead of during the first step."""
        if self.recompute == "offloaded" and (count := len(self.model.layers) - self.offload_keep) > 0:
            embed = self.model.embed_tokens.weight  # the residual stream's dtype: what every layer receives
            self.offloader.reserve((batch, seq_len, self.config.hidden_size), embed.dtype, embed.device, count)

    def set_tiling(self, tile: int | None) -> None:
        """Run every RMSNorm and MLP over `tile` tokens at a time in training (None: whole sequences)."""
        if tile is not None and tile <= 0:
            raise ValueError(f"tile must be positive, got {tile}")
        for module in self.modules():
            if isinstance(module, (RMSNorm, MLP, SparseMoeBlock)):
                module.tile = tile

    def fuse_projections(self, enabled: bool = True) -> list[FusedLinear]:
        """Inference engines: q/k/v and gate/up each as one matmul, every linear layer behind a FusedLinear that
        can take the Triton GEMV for single rows (models/fused_linear.py; layers that are not plain nn.Linear,
        e.g. LoRA-wrapped or tensor-parallel with hooks, stay as they are). Fusing again is free; `enabled=False`
        goes back to the plain layers over the same (view) weights. Only passes without autograd take these
        (models/inference.py; training sees the separate layers). The model must not be moved or cast after
        fusing. Returns them."""
        return inference.fuse_projections(self, enabled)

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: KVCache | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """input_ids (B, S) -> logits (B, S, V), or (B, 1, V) with `last_only` (prefill for generation).

        positions (B, S) default to 0..S-1 after what `cache` already holds.
        """
        x = self.hidden(input_ids, positions, cache)
        if last_only:
            x = x[:, -1:]
        return self.logits(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head over final hidden states (..., d) -> (..., V)."""
        if not torch.is_grad_enabled():
            return inference.logits(self, hidden)
        return self.lm_head(hidden)

    def hidden(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: KVCache | None = None,
        doc_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The final-norm hidden states (B, S, hidden): what the LM head (or a chunked loss) consumes.

        doc_ids (B, S) mark packed documents: attention stays inside each one (positions should restart too).
        """
        B, S = input_ids.shape
        if positions is None:  # the paged engine always passes positions
            start = cache.length if cache is not None else 0
            positions = torch.arange(start, start + S, device=input_ids.device).expand(B, S)
        x = self.model.embed_tokens(input_ids)  # (B, S, hidden)
        cos, sin = self.rotary(positions, x.dtype)  # (B, S, head_dim)
        if not torch.is_grad_enabled():  # inference: these layers with the residual adds fused into the norms
            return inference.hidden(self.model, x, cos, sin, cache, doc_ids)
        if cache is not None:  # autograd on while generating: nothing is recomputed, K/V are written once
            for layer in self.model.layers:
                x = layer(x, cos, sin, cache, doc_ids)
            return self.model.norm(x)
        if self.recompute == "offloaded":
            self.offloader.reset()  # a new pass: backward prefetches the offloaded inputs in this pass's order
        for layer, run in zip(self.model.layers, self.layer_runs, strict=True):
            x = run(layer, x, cos, sin, doc_ids)  # layer(x, ...), or under a checkpoint (set_recompute)
        return self.model.norm(x)
