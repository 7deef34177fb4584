"""The Llama-family decoder shared by the trainer, `generate` and the engine.

Parameter names follow HF transformers (`model.layers.0.self_attn.q_proj.weight`, ...) so checkpoints, PEFT
adapters and exports map one to one. The model takes explicit inputs: token ids, their positions and, when
generating, a KV cache; cache policy lives with the caller.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from longseq.attention import attention
from longseq.config import ModelConfig
from longseq.config.policy import PLAIN_LAYER_POLICIES, RECOMPUTE_POLICIES
from longseq.models import fused, recompute
from longseq.models.fused_linear import FusedLinear, fuse
from longseq.models.offload import LayerInputOffloader
from longseq.models.rope import RotaryEmbedding, apply_rope
from longseq.models.tiling import tiled_mlp, tiled_rms_norm

if TYPE_CHECKING:
    from longseq.generation.kv_cache import KVCache  # or the engine's PagedKVCache: same `attention` method


def _maybe_checkpoint(enabled: bool, fn, *args):
    if enabled and torch.is_grad_enabled():
        return recompute.checkpoint(fn, *args)
    return fn(*args)


def _inference(layer: FusedLinear | None) -> FusedLinear | None:
    """The FusedLinear to run instead of the plain layer(s): only set by fuse_projections, and only without autograd
    (its weights are detached views, so gradients would not reach the parameters)."""
    return layer if layer is not None and not torch.is_grad_enabled() else None


class RMSNorm(nn.Module):
    # Zhang & Sennrich 2019 (arXiv 1910.07467); normalise in float32, scale in the input dtype (as HF Llama).
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.tile: int | None = None  # long sequences: tiled fp32 math, no fp32 copy of x kept (models/tiling.py)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fused.active(x):  # one Triton pass; saves x and a float32 rstd per row, as the tiled norm does
            return fused.rms_norm(x, self.weight, self.eps)
        if self.tile is not None and torch.is_grad_enabled() and x.numel() // x.shape[-1] > self.tile:
            return tiled_rms_norm(x, self.weight, self.eps, self.tile)
        dtype = x.dtype
        x = x.to(torch.promote_types(dtype, torch.float32))  # fp32 maths (float64 stays float64, for tests)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)

    def add_forward(self, x: torch.Tensor, delta: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(h, norm(h)) for h = x + delta (x alone when delta is None): the residual add and the norm after it,
        one kernel in inference where the fused kernels run."""
        if delta is None:
            return x, self(x)
        if fused.active(x) and delta.dtype == x.dtype and not torch.is_grad_enabled():
            return fused.add_rms_norm(x, delta, self.weight, self.eps)
        h = x + delta
        return h, self(h)


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
        self.recompute_core = False  # selective recompute: keep projections, recompute norms/RoPE/attention
        self.qkv: FusedLinear | None = None  # q/k/v as one matmul (CausalLM.fuse_projections, inference)
        self.o: FusedLinear | None = None  # o_proj as inference runs it (a Triton GEMV for single rows, maybe)
        self.sequence_parallel = None  # distributed.ulysses.UlyssesAttention when the sequence is split over GPUs

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: KVCache | None = None,
        doc_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        q, k, v = self.project(x)
        # Recompute is for training; a cache means generation, where the core writes K/V and must run once.
        out = _maybe_checkpoint(self.recompute_core and cache is None, self._core, q, k, v, cos, sin, cache, doc_ids)
        return self.output(out)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, S, d) -> q (B, S, H, D), k and v (B, S, H_kv, D)."""
        B, S, _ = x.shape
        if _inference(self.qkv):
            q, k, v = self.qkv(x)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
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
        B, _, S, _ = out.shape
        proj = _inference(self.o) or self.o_proj
        return proj(out.transpose(1, 2).reshape(B, S, self.num_heads * self.head_dim))

    def _core(self, q, k, v, cos, sin, cache, doc_ids) -> torch.Tensor:
        """q (B, S, H, D), k/v (B, S, H_kv, D) from the projections -> attention output (B, H, S, D)."""
        return self.attend(*self.position(q, k, v, cos, sin), cache, doc_ids)


class MLP(nn.Module):
    # SwiGLU (Shazeer 2020, arXiv 2002.05202): down(silu(gate(x)) * up(x)).
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)
        self.recompute_act = False  # keep gate and up, recompute silu(gate) * up (and a frozen down_proj's input)
        self.gate_up: FusedLinear | None = None  # gate and up as one matmul (CausalLM.fuse_projections)
        self.down: FusedLinear | None = None
        self.tile: int | None = None  # long sequences: run over this many tokens at a time (models/tiling.py)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, S, d) -> (B, S, d). Its output only ever feeds the residual add that ends the layer, so a recompute
        never reads it (models/recompute.py): the frozen down_proj is skipped there, a tiled MLP entirely."""
        if self.tile is not None and torch.is_grad_enabled() and x.numel() // x.shape[-1] > self.tile:
            params = [p for p in self.parameters() if p.requires_grad]
            with recompute.output_unused():
                return tiled_mlp(self._forward, x, params, self.tile)
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if _inference(self.gate_up):
            gate, up = self.gate_up(x)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        checkpointed = self.recompute_act and torch.is_grad_enabled()
        if checkpointed and getattr(self.down_proj, "frozen_base", False):
            # LoRA: the checkpoint takes in down_proj too, so silu(gate)·up is not kept as the adapter's input
            # either; its recompute skips the frozen matmul (models/recompute.py), only the adapter runs again.
            return recompute.checkpoint(self._down, gate, up)
        return self._down(gate, up, checkpointed)

    def _down(self, gate: torch.Tensor, up: torch.Tensor, checkpoint_act: bool = False) -> torch.Tensor:
        act = _maybe_checkpoint(checkpoint_act, _swiglu, gate, up)
        with recompute.output_unused():
            return (_inference(self.down) or self.down_proj)(act)


def _swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    if fused.active(gate) and gate.shape == up.shape:  # keeps gate and up, not silu(gate) as well
        return fused.swiglu(gate, up)
    return F.silu(gate) * up


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)
        self.keep_attention = False  # recompute "keep_attention": checkpoint around attention, never through it

    def forward(self, x, cos, sin, cache=None, doc_ids=None):
        if self.keep_attention and cache is None and torch.is_grad_enabled():
            # Two checkpoints around attention instead of one over the layer: backward recomputes the norms and
            # projections, but attention's saved q, k, v, output and log-sum-exp stay from the forward, so the
            # layer's costliest kernel at long sequences runs once, not twice.
            q, k, v = recompute.checkpoint(self._qkv, x, cos, sin)
            out = self.self_attn.attend(q, k, v, None, doc_ids)
            return recompute.checkpoint(self._after_attention, x, out)
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, doc_ids)
        return x + self.mlp(self.post_attention_layernorm(x))

    def step(self, x, delta, cos, sin, cache=None, doc_ids=None):
        """Inference form of forward over a residual stream: the layer's input is x + delta (the previous layer's
        MLP output, not yet added, so the add fuses into this layer's first norm); returns (h, MLP output), whose
        sum is the layer's output."""
        x, normed = self.input_layernorm.add_forward(x, delta)
        x, normed = self.post_attention_layernorm.add_forward(x, self.self_attn(normed, cos, sin, cache, doc_ids))
        return x, self.mlp(normed)

    def _qkv(self, x, cos, sin):
        attn = self.self_attn
        normed = self.input_layernorm(x)
        # The recompute needs only the projections' inputs (their adapters'): attention kept q, k and v from the
        # forward, and RoPE's backward reads no values. Qwen3's q/k norms do, so they keep the matmuls.
        with recompute.output_unused(attn.q_norm is None):
            q, k, v = attn.project(normed)
        return attn.position(q, k, v, cos, sin)

    def _after_attention(self, x, out):
        x = x + self.self_attn.output(out)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    """Embeddings, layers and final norm: HF's `model.` prefix."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class CausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Decoder(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rotary = RotaryEmbedding(cfg.rope, cfg.head_dim)
        self.recompute = "none"
        self.offload_keep = 0  # recompute "offloaded": the last layers whose inputs stay on the GPU
        self.plain_layers = 0  # keep_attention / full: the last layers that recompute only SwiGLU (memory permitting)
        self.offloader: LayerInputOffloader | None = None
        self.head: FusedLinear | None = None  # lm_head as inference runs it (fuse_projections)
        self.tie_weights()

    def set_recompute(self, policy: str, keep_on_gpu: int = 0, plain_layers: int = 0) -> None:
        """Activation checkpointing: none; selective (recompute attention internals and the SwiGLU product,
        keep every matmul output, after Korthikanti et al. 2022); keep_attention (recompute everything but
        attention, whose inputs and output stay: the long-sequence inverse of selective); full (keep only each
        layer's input); offloaded (full, with the inputs of all but the last `keep_on_gpu` layers in pinned host
        memory). Under keep_attention or full, the last `plain_layers` layers recompute nothing but the SwiGLU
        product: what memory is left over buys back recompute layer by layer."""
        if policy not in RECOMPUTE_POLICIES:
            raise ValueError(f"recompute policy must be one of {RECOMPUTE_POLICIES}, got {policy!r}")
        num_layers = len(self.model.layers)
        if plain_layers and (policy not in PLAIN_LAYER_POLICIES or not 0 <= plain_layers <= num_layers):
            raise ValueError(f"plain_layers needs recompute keep_attention or full and 0..{num_layers} layers, got "
                             f"{plain_layers} with {policy!r}")
        self.recompute, self.offload_keep, self.plain_layers = policy, max(0, keep_on_gpu), plain_layers
        if policy == "offloaded" and self.offloader is None:
            self.offloader = LayerInputOffloader()
        for i, layer in enumerate(self.model.layers):
            plain = self._plain(i)
            layer.self_attn.recompute_core = policy == "selective"
            layer.mlp.recompute_act = policy == "selective" or plain
            layer.keep_attention = policy == "keep_attention" and not plain

    def reserve_offload(self, batch: int, seq_len: int) -> None:
        """Recompute offloaded: allocate (page-lock) the host buffers of the offloaded layer inputs now, for
        micro-batches of (batch, seq_len) tokens, instead of during the first step."""
        if self.recompute == "offloaded" and (count := len(self.model.layers) - self.offload_keep) > 0:
            embed = self.model.embed_tokens.weight  # the residual stream's dtype: what every layer receives
            self.offloader.reserve((batch, seq_len, self.config.hidden_size), embed.dtype, embed.device, count)

    def _plain(self, i: int) -> bool:
        """Whether layer i is one of the last `plain_layers` (only the SwiGLU product recomputed)."""
        return i >= len(self.model.layers) - self.plain_layers

    def set_tiling(self, tile: int | None) -> None:
        """Run every RMSNorm and MLP over `tile` tokens at a time in training (None: whole sequences)."""
        if tile is not None and tile <= 0:
            raise ValueError(f"tile must be positive, got {tile}")
        for module in self.modules():
            if isinstance(module, (RMSNorm, MLP)):
                module.tile = tile

    def fuse_projections(self, enabled: bool = True) -> list[FusedLinear]:
        """Inference engines: q/k/v and gate/up each as one matmul, every linear layer behind a FusedLinear that
        can take the Triton GEMV for single rows (models/fused_linear.py; layers that are not plain nn.Linear,
        e.g. LoRA-wrapped or tensor-parallel with hooks, stay as they are). Fusing again is free; `enabled=False`
        goes back to the plain layers over the same (view) weights. Only passes without autograd take these
        (training sees the separate layers). The model must not be moved or cast after fusing. Returns them."""
        if not enabled:
            for layer in self.model.layers:
                layer.self_attn.qkv = layer.self_attn.o = layer.mlp.gate_up = layer.mlp.down = None
            self.head = None
            return []
        for layer in self.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            attn.qkv = attn.qkv or fuse([attn.q_proj, attn.k_proj, attn.v_proj])
            attn.o = attn.o or fuse([attn.o_proj])
            mlp.gate_up = mlp.gate_up or fuse([mlp.gate_proj, mlp.up_proj])
            mlp.down = mlp.down or fuse([mlp.down_proj])
        self.head = self.head or fuse([self.lm_head])
        found = [m for layer in self.model.layers for m in (layer.self_attn.qkv, layer.self_attn.o,
                                                              layer.mlp.gate_up, layer.mlp.down)]
        return [m for m in [*found, self.head] if m is not None]

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
        return (_inference(self.head) or self.lm_head)(hidden)

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
        if not torch.is_grad_enabled():  # inference: residual adds fused into the norms after them
            delta = None
            for layer in self.model.layers:
                x, delta = layer.step(x, delta, cos, sin, cache, doc_ids)
            return self.model.norm.add_forward(x, delta)[1]
        full = self.recompute in ("full", "offloaded") and cache is None
        offload_below = len(self.model.layers) - self.offload_keep if self.recompute == "offloaded" else 0
        if offload_below and torch.is_grad_enabled() and cache is None:
            self.offloader.reset()
        else:
            offload_below = 0
        for i, layer in enumerate(self.model.layers):
            if i < offload_below:
                x = self.offloader.run(layer, x, cos, sin, None, doc_ids, keep=(cos, sin, doc_ids))
            else:
                x = _maybe_checkpoint(full and not self._plain(i), layer, x, cos, sin, cache, doc_ids)
        return self.model.norm(x)
