"""A mixture-of-experts decoder under the model's policies: every recompute policy and tiling give the plain
forward's loss and gradients, and the cached generation path its logits."""

import pytest
import torch

from longseq.models.sparse_moe import SparseMoeBlock
from tiny_models import cached_logits, loss_and_grads, random_model

# Qwen2-MoE's shape: a shared expert, a dense second layer, unnormalised top-k weights.
MOE = dict(num_layers=3, num_experts=4, experts_per_token=2, moe_intermediate_size=32,
           shared_expert_intermediate_size=40, norm_topk_prob=False, sparse_layers=(True, False, True))


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 97, (2, 24), generator=g), torch.randint(0, 97, (2, 24), generator=g)


def test_layers_follow_sparse_layers():
    model = random_model(**MOE)
    assert [isinstance(layer.mlp, SparseMoeBlock) for layer in model.model.layers] == [True, False, True]
    assert model.model.layers[0].mlp.shared_expert is not None


@pytest.mark.parametrize("policy", ["selective", "keep_attention", "full", "offloaded"])
def test_recompute_policies_are_exact(policy):
    ids, targets = _data()
    model = random_model(**MOE).double()
    loss, grads = loss_and_grads(model, ids, targets)
    model.set_recompute(policy)
    model.set_tiling(8)  # the shared expert and the dense layer's MLP run tiled; the experts whole
    loss2, grads2 = loss_and_grads(model, ids, targets)
    torch.testing.assert_close(loss2, loss)
    assert grads2.keys() == grads.keys()
    for name, g in grads.items():
        torch.testing.assert_close(grads2[name], g, msg=name)
    assert any("experts.gate_up_proj" in n for n in grads) and any("mlp.gate.weight" in n for n in grads)


def test_cached_generation_matches_one_forward():
    model = random_model(**MOE).double()
    ids, _ = _data()
    with torch.no_grad():
        full = model(ids)
        torch.testing.assert_close(cached_logits(model, ids, prefill=10), full)
