"""Optimizers and the learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from longseq.config import TrainConfig


def trainable_groups(model: nn.Module) -> list[list[tuple[str, nn.Parameter]]]:
    """The optimizer's parameter groups, by name: matrices (weight decay), then vectors. Empty groups left out.

    torch numbers an optimizer's parameters 0, 1, ... in this order in its state_dict."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    # No weight decay on norms, biases and other vectors (as in GPT-2 / nanoGPT).
    groups = [[(n, p) for n, p in params if p.dim() >= 2], [(n, p) for n, p in params if p.dim() < 2]]
    return [g for g in groups if g]


def build_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    groups = [{"params": [p for _, p in g], "weight_decay": cfg.weight_decay if g[0][1].dim() >= 2 else 0.0}
              for g in trainable_groups(model)]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999), fused=device.type == "cuda")
    if cfg.optimizer == "adamw8bit":
        # torchao's block-wise 8-bit Adam states (Dettmers et al. 2021, arXiv 2110.02861): 2 bytes/param not 8.
        from longseq.train.lora import quiet_torchao

        quiet_torchao()
        from torchao.optim import AdamW8bit

        return AdamW8bit(groups, lr=cfg.lr, betas=(0.9, 0.999))
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9)
    # Adafactor (Shazeer & Stern 2018, arXiv 1804.04235): factored second moments, O(rows + cols) state.
    return torch.optim.Adafactor(groups, lr=cfg.lr)


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of cfg.lr at optimizer step `step` (0-based): linear warm-up, then cosine/linear/constant."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(progress, 1.0)
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.schedule == "cosine" else 1 - progress
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * decay


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg))
