"""Measure, on CPU, the activation bytes longseq's training step really keeps and its live peak.

- saved_bytes: unique storages packed by autograd's saved-tensor hooks during forward (parameters excluded): what
  the step keeps for backward. Non-reentrant checkpointing saves its inputs through the same hooks.
- peak_bytes: a TorchDispatchMode that counts every storage an op creates and a weakref finalizer that uncounts it
  when freed: the most bytes alive at once during forward + backward (parameters excluded, gradients included).
  Kernel-internal workspace (e.g. CUDA FlashAttention's fp32 dQ accumulator) is invisible here.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from longseq.config import ModelConfig, TrainConfig
from longseq.models.llama import CausalLM
from longseq.train.lora import apply_lora
from longseq.train.loss import chunked_cross_entropy

NF4_PARTS = ("quantized_scalers", "quantization_factor", "scaler_mean", "quantized_data", "nf4")


def _is_nf4(t) -> bool:
    return type(t).__name__ == "NF4Tensor"


def parse_policy(policy: str) -> tuple[str, int, int]:
    """"keep_attention+2": the last 2 layers plain; "full^2": full's last 2 layers under keep_attention."""
    policy, _, kept = policy.partition("^")
    policy, _, plain = policy.partition("+")
    return policy, int(plain or 0), int(kept or 0)


def build(cfg: ModelConfig, method: str, policy: str, targets: tuple[str, ...], rank: int = 16) -> CausalLM:
    """As longseq train builds it: fp32 masters for full fine-tuning, a bf16 base with fp32 adapters for LoRA."""
    torch.manual_seed(0)
    model = CausalLM(cfg).to(torch.float32 if method == "full" else torch.bfloat16)
    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        apply_lora(model, TrainConfig(lora_rank=rank, lora_alpha=2 * rank, method=method, lora_targets=targets))
    policy, plain, kept = parse_policy(policy)
    model.set_recompute(policy, plain_layers=plain, attention_layers=kept)
    model.train()
    return model


def model_storages(model: torch.nn.Module) -> set[int]:
    out = set()
    for t in list(model.parameters()) + list(model.buffers()):
        if _is_nf4(t):
            out.update(getattr(t, name).untyped_storage().data_ptr() for name in NF4_PARTS)
        else:
            out.add(t.untyped_storage().data_ptr())
    return out


def forward_loss(model: CausalLM, ids: torch.Tensor, chunk: int, keep_hidden: bool):
    """The benchmark's (keep_hidden False) or the trainer's (True: `hidden` referenced through backward) step."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = model.hidden(ids)
        targets = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)
        loss = chunked_cross_entropy(hidden.flatten(0, 1), model.lm_head.weight, targets.flatten(), chunk)
    return loss / ids.numel(), (hidden if keep_hidden else None)


def saved_bytes(model: CausalLM, ids: torch.Tensor, chunk: int) -> int:
    skip = model_storages(model)
    seen: dict[int, int] = {}

    def pack(t):
        if not _is_nf4(t):
            storage = t.untyped_storage()
            if storage.data_ptr() not in skip and storage.nbytes():
                seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward_loss(model, ids, chunk, keep_hidden=False)
    return sum(seen.values())


class LiveBytes(TorchDispatchMode):
    """`mark`: a substring of op names (e.g. "attention_for_cpu_backward"); `marks` gets the live bytes right after
    each such op, its outputs included."""

    def __init__(self, skip: set[int], mark: str | None = None):
        super().__init__()
        self.skip, self.sizes, self.live, self.peak = skip, {}, 0, 0
        self.mark, self.marks = mark, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self._count(out)
        if self.mark is not None and self.mark in str(func):
            self.marks.append(self.live)
        return out

    def _count(self, out) -> None:
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and not _is_nf4(t):
                storage = t.untyped_storage()
                key, size = storage.data_ptr(), storage.nbytes()
                if key in self.sizes or key in self.skip or not size:
                    continue
                self.sizes[key] = size
                self.live += size
                self.peak = max(self.peak, self.live)
                weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        size = self.sizes.pop(key, None)
        if size is not None:
            self.live -= size


def peak_bytes(model: CausalLM, ids: torch.Tensor, chunk: int, keep_hidden: bool) -> int:
    tracker = LiveBytes(model_storages(model))
    with tracker:
        loss, hidden = forward_loss(model, ids, chunk, keep_hidden)
        loss.backward()
        del hidden
    return tracker.peak


def transient_bytes(fn, *args, skip: set[int] = frozenset()) -> tuple[int, int]:
    """(peak, still alive) bytes of the storages `fn(*args)` creates."""
    tracker = LiveBytes(set(skip))
    with tracker:
        out = fn(*args)
        alive = tracker.live
    del out
    return tracker.peak, alive
