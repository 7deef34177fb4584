"""A run's model split over its processes by its layout (--dp --tp --cp --sp --pp --ep): the one place the techniques
are applied, in the order they compose."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from longseq.config import TrainConfig
from longseq.errors import LongseqError
from longseq.train.parallel import experts, tensor_parallel
from longseq.train.parallel.data_parallel import wrap
from longseq.train.parallel.env import DistEnv
from longseq.train.parallel.pipeline import Pipeline
from longseq.train.parallel.ulysses import enable_sequence_parallel
from longseq.train.precision import Precision
from longseq.train.step import TokenLoss, router_loss_for


def parallelize(model, cfg: TrainConfig, env: DistEnv, precision: Precision,
                materialize: Callable[[nn.Module], object] | None = None):
    """What a training step runs for `model` (a CausalLM with its adapters): its pipeline stages on this process
    (--pp), or the model with its loss as one module, its attention split over the sequence's ranks (ring, Ulysses),
    its layers over the tensor-parallel ranks, its experts over the expert-parallel ranks, and the whole data
    parallel (DDP, or FSDP2 sharding what is left). `materialize(root)`, for a model built on meta
    (train/parallel/meta_loading.py), gives it storage once it is split: before DDP wraps it (DDP broadcasts rank
    0's weights), after FSDP2 or the pipeline does."""
    router_loss = router_loss_for(model, cfg.router_aux_loss_coef, cfg.router_z_loss_coef)
    if env.pp > 1:
        if router_loss is not None:
            raise LongseqError("a mixture of experts' router losses are not summed across pipeline stages yet: "
                               "train it without --pp, or with --router-aux-loss-coef 0")
        return _filled(Pipeline(model, env, cfg.pp_schedule, cfg.grad_accum, cfg.loss_chunk), materialize)
    step_model = TokenLoss(model, cfg.loss_chunk, router_loss)
    enable_sequence_parallel(model, env)
    if env.tp > 1:
        tensor_parallel.parallelize(model, env.grid["tp"], env.tp)
    if env.ep > 1:
        experts.split_experts(model, env)
        experts.ignore_in_ddp(step_model)  # DDP neither broadcasts nor averages them (train/parallel/experts.py)
    if env.parallel != "fsdp":
        step_model, materialize = _filled(step_model, materialize), None
    if env.distributed:
        step_model = wrap(step_model, env, precision, offload=cfg.fsdp_offload)
    return _filled(step_model, materialize)


def _filled(root: nn.Module, materialize: Callable[[nn.Module], object] | None) -> nn.Module:
    if materialize is not None:
        materialize(root)
    return root
