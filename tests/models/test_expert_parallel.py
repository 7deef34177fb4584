"""Expert parallelism (models/expert_parallel.py): 2 gloo processes, each with half the experts and its own tokens,
give the single-process loss and gradients (full fine-tuning and per-expert LoRA) and logits."""

import pytest
import torch

from dist_helpers import run_workers
from longseq.config import TrainConfig
from longseq.models.sparse_moe import SparseMoeBlock
from longseq.train.lora import make_trainable
from longseq.train.step import TokenLoss
from tiny_models import random_model

MODEL = dict(arch="qwen2_moe", num_experts=4, experts_per_token=2, moe_intermediate_size=32,
             shared_expert_intermediate_size=32)
WORLD = 2


def _model(method: str):
    model = random_model(**MODEL).train()
    make_trainable(model, TrainConfig(method=method, lora_rank=4, lora_alpha=8))
    torch.manual_seed(1)
    with torch.no_grad():  # adapters away from their zero start
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.1)
    return model


def _batch():
    g = torch.Generator().manual_seed(2)
    return torch.randint(0, 97, (WORLD, 12), generator=g), torch.randint(0, 97, (WORLD, 12), generator=g)


def _loss_grads(model, ids, targets, mode):
    for block in model.modules():
        if isinstance(block, SparseMoeBlock):
            block.mode = mode
    loss = TokenLoss(model, 16)(ids, None, None, targets)
    loss.backward()
    with torch.no_grad():
        model.eval()
        logits = model(ids)
    return loss.item(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}, logits


CASES = (("full", "loop"), ("lora", "grouped_mm"))


def _worker(rank, world):
    import torch.distributed as dist

    from longseq.models.expert_parallel import shard_experts

    dist.init_process_group("gloo")
    out = {}
    ids, targets = _batch()
    for method, mode in CASES:
        model = _model(method)
        shard = shard_experts(model)
        loss, grads, logits = _loss_grads(model, ids[rank : rank + 1], targets[rank : rank + 1], mode)
        out[method, mode] = shard.first, shard.num_local, loss, grads, logits
    return out


@pytest.fixture(scope="module")
def ranks():
    """Per rank, per case: (first expert, experts held, loss, gradients, logits), from one start of 2 processes."""
    return run_workers(_worker, WORLD, timeout=180)


@pytest.mark.parametrize("method,mode", CASES)
def test_two_processes_equal_one(ranks, method, mode):
    ids, targets = _batch()
    ref_loss, ref_grads, ref_logits = _loss_grads(_model(method), ids, targets, mode)
    results = [r[method, mode] for r in ranks]
    assert abs(sum(r[2] for r in results) - ref_loss) <= 1e-4 * abs(ref_loss)
    for rank, (first, num_local, _, grads, logits) in enumerate(results):
        assert torch.allclose(logits, ref_logits[rank : rank + 1], atol=1e-5)
        assert num_local == MODEL["num_experts"] // WORLD
        for n, g in grads.items():
            if ".experts." in n:  # this rank's experts: their gradients from both ranks' tokens
                assert torch.allclose(g, ref_grads[n][first : first + num_local], rtol=1e-4, atol=1e-5), n
    for n in ref_grads:
        if ".experts." not in n:  # everything else: the ranks' gradients sum to one process's
            total = sum(r[3][n] for r in results)
            assert torch.allclose(total, ref_grads[n], rtol=1e-4, atol=1e-5), n
