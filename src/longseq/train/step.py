"""One optimizer step: the training forward as one module (token ids -> summed next-token loss) and the step over a
batch's micro-batches.

DDP and FSDP2 act in hooks around a module's forward (FSDP2 gathers the root's embedding, final norm and LM head
there), so the trainer's forward, `hidden` plus the chunked LM head + loss, must be one module call to be wrapped.
"""

from __future__ import annotations

import torch
from torch import nn

from longseq.models.llama import CausalLM
from longseq.models.router_loss import RouterLoss
from longseq.models.sparse_moe import SparseMoeBlock
from longseq.train.loss import IGNORE, chunked_cross_entropy
from longseq.train.parallel.data_parallel import clip_grad_norm, gradient_sync
from longseq.train.parallel.env import DistEnv
from longseq.train.parallel.experts import sync_expert_grads
from longseq.train.parallel.pipeline import Pipeline


class TokenLoss(nn.Module):
    def __init__(self, lm: nn.Module, loss_chunk: int, router_loss: RouterLoss | None = None):
        """`router_loss`: a mixture of experts' auxiliary losses (router_loss_for), or None."""
        super().__init__()
        self.lm, self.loss_chunk, self.router_loss = lm, loss_chunk, router_loss

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, doc_ids: torch.Tensor | None,
                targets: torch.Tensor) -> torch.Tensor:
        """Sum of the token losses of (B, S) ids / positions / targets. Under Ulysses these are this rank's
        (B, S/N) shard while doc_ids, when given, cover the whole (B, S) sequence (attention sees all of it)."""
        if self.router_loss is not None:
            self.router_loss.begin()
        hidden = self.lm.hidden(input_ids, positions, doc_ids=doc_ids)
        loss = chunked_cross_entropy(hidden.flatten(0, 1), self.lm.lm_head.weight, targets.flatten(),
                                     self.loss_chunk)
        aux = self.router_loss.value() if self.router_loss is not None else None
        if aux is not None:
            # The step divides by its target tokens: weighted by this micro-batch's, one micro-batch on one process
            # gives transformers' loss, mean cross-entropy + coef · aux; several, the token-weighted mean of theirs.
            loss = loss + aux * (targets != IGNORE).sum()
        return loss


def router_loss_for(model: CausalLM, aux_coef: float | None, z_coef: float = 0.0) -> RouterLoss | None:
    """A mixture of experts' router losses, wired into its sparse blocks; None for a dense model or both weights 0.
    `aux_coef` None: the model config's (transformers' choice)."""
    cfg = model.config
    aux = cfg.router_aux_loss_coef if aux_coef is None else aux_coef
    if not cfg.is_moe or not (aux or z_coef):
        return None
    loss = RouterLoss(cfg.num_experts, aux, z_coef)
    for module in model.modules():
        if isinstance(module, SparseMoeBlock):
            module.router_loss = loss
    return loss


def train_step(model, micro_batches, cfg, precision, device, optimizer, scaler, env: DistEnv | None = None) -> float:
    """One optimizer step over grad_accum micro-batches; the loss is the mean over all their target tokens, on all
    processes: sum of token losses / total target tokens (so data parallel equals one process on the same batch).

    `model` is a train.step.TokenLoss (possibly DDP / FSDP-wrapped), a bare CausalLM, or a pipeline's stages
    (train/parallel/pipeline.py), whose schedule runs all the micro-batches."""
    env = env or DistEnv(device=device)
    if isinstance(model, CausalLM):
        model = TokenLoss(model, cfg.loss_chunk)
    if isinstance(model, Pipeline):
        total = env.all_reduce_sum(model.forward_backward(micro_batches, precision, device))  # the last stage's
    else:
        total = _forward_backward(model, micro_batches, precision, device, scaler, env)
    split = (sync_expert_grads(model, env), env.group("ep")) if env.ep > 1 else None  # expert parallel
    if scaler is not None:
        scaler.unscale_(optimizer)
    if cfg.max_grad_norm > 0:
        params = [p for p in model.parameters() if p.grad is not None]
        clip_grad_norm(params, cfg.max_grad_norm, env.group("pp") if env.pp > 1 else None, split)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total


def _forward_backward(model, micro_batches, precision, device, scaler, env: DistEnv) -> float:
    """Forward and backward of each micro-batch in turn, gradients accumulated; returns the step's loss."""
    shard = env.shard_sequence  # context / sequence / tensor parallel: this rank's tokens; else the identity
    num_targets = max(1, env.all_reduce_sum(sum(int((shard(b.targets) != IGNORE).sum()) for b in micro_batches)))
    total = 0.0
    for i, b in enumerate(micro_batches):
        ids, targets = shard(b.input_ids).to(device), shard(b.targets).to(device)
        positions = env.shard_positions(b.positions).to(device)
        # Rows that hold a single segment need no document mask (the fast causal kernel). The whole sequence's:
        # attention runs over all of it.
        doc_ids = b.doc_ids.to(device) if bool((b.positions[:, 1:] == 0).any()) else None
        with gradient_sync(model, env, sync=i == len(micro_batches) - 1):  # exchange grads on the last one only
            with precision.autocast():
                loss = model(ids, positions, doc_ids, targets) / num_targets
            # DDP and FSDP average gradients over the processes; times their number, that mean is the sum.
            scaled = loss * env.grad_ranks if env.distributed else loss
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        total += loss.item()
    return env.all_reduce_sum(total)
