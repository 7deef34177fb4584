"""The recompute skips exactly the frozen matmuls whose outputs no backward reads, and nothing else
(models/recompute.py). Exactness of every policy with the skips is in test_exactness.py / test_long_context.py, run
with skipped outputs filled with NaN (tests/conftest.py)."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from longseq.config import ModelConfig, TrainConfig
from longseq.models import recompute
from longseq.models.llama import Attention, CausalLM
from longseq.train.lora import LoRALinear, apply_lora
from tiny_models import loss_and_grads

CFG = ModelConfig(vocab_size=96, hidden_size=64, intermediate_size=160, num_layers=3, num_heads=4, num_kv_heads=2,
                  max_seq_len=128)
RANK = 4
B, S = 2, 40


def _model(method: str = "lora") -> CausalLM:
    torch.manual_seed(0)
    model = CausalLM(CFG)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    apply_lora(model, TrainConfig(method=method, lora_rank=RANK))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear) and m.rank:
                m.lora_B.weight.normal_(0, 0.1)
    return model


class _Flops(TorchDispatchMode):
    """Matmul FLOPs of every op dispatched (torch's FlopCounterMode without its module tracker, whose hooks do not
    support the tiled MLP's autograd.grad inside backward)."""

    total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = func._overloadpacket  # in-place ops (LoRA's addmm_) count as their out-of-place form
        count = flop_registry.get(packet)
        if count is None and packet.__name__ == "addmm_":
            count = flop_registry[torch.ops.aten.addmm]
        if count is not None:
            self.total += count(*args, **kwargs, out_val=out)
        return out


def _flops(model, ids, targets) -> int:
    with _Flops() as counter:
        loss_and_grads(model, ids, targets)
    return counter.total


def _data():
    ids = torch.randint(0, CFG.vocab_size, (B, S), generator=torch.Generator().manual_seed(1))
    return ids, torch.roll(ids, -1, 1)


D, INTER, Q, KV = CFG.hidden_size, CFG.intermediate_size, CFG.num_heads * CFG.head_dim, CFG.num_kv_heads * CFG.head_dim
T, L = B * S, CFG.num_layers
DOWN = 2 * T * INTER * D  # one forward of a layer's frozen down_proj
QKV = 2 * T * D * (Q + 2 * KV)
# the MLP forward: frozen gate, up, down, and LoRA A and B of each
MLP_FORWARD = 2 * T * (3 * D * INTER + RANK * (2 * D + INTER) + RANK * (2 * INTER + D))


@pytest.mark.parametrize("policy,plain,kept,tile,skipped", [
    ("keep_attention", 0, 0, None, L * (QKV + DOWN)),  # q/k/v (attention kept its inputs) and down
    ("full", 0, 0, None, L * DOWN),  # attention is recomputed: q/k/v run
    # tiled: the checkpoint's recompute skips the whole MLP, the tiles' own recompute the down projections
    ("full", 0, 0, 16, L * (MLP_FORWARD + DOWN)),
    ("offloaded", 0, 0, 16, L * (MLP_FORWARD + DOWN)),
    ("selective", 0, 0, None, L * DOWN),  # SwiGLU's checkpoint takes in the frozen down_proj
    # plain layers recompute SwiGLU and down's adapter only
    ("keep_attention", 2, 0, None, (L - 2) * (QKV + DOWN) + 2 * DOWN),
    ("full", 1, 0, None, L * DOWN),
    # full's last layer under keep_attention skips its q/k/v too
    ("full", 0, 1, None, (QKV + DOWN) + (L - 1) * DOWN),
])
@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_recompute_skips_the_unread_matmuls(policy, plain, kept, tile, skipped, method, monkeypatch):
    if method == "qlora":
        pytest.importorskip("torchao")
    model = _model(method)
    model.set_recompute(policy, keep_on_gpu=0, plain_layers=plain, attention_layers=kept)
    model.set_tiling(tile)
    ids, targets = _data()
    with_skips = _flops(model, ids, targets)
    loss, grads = loss_and_grads(model, ids, targets)
    monkeypatch.setattr(recompute, "skip", lambda: False)
    without = _flops(model, ids, targets)
    ref_loss, ref_grads = loss_and_grads(model, ids, targets)
    assert without - with_skips == skipped
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=0)
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-5, atol=1e-6, msg=name)


def test_a_skipped_output_that_backward_reads_shows_as_nan(monkeypatch):
    # The guard the exactness tests rely on: o_proj's output feeds the post-attention norm, whose backward reads it.
    model = _model()
    model.set_recompute("keep_attention")
    output = Attention.output

    def unread(self, out):
        with recompute.output_unused():
            return output(self, out)

    monkeypatch.setattr(Attention, "output", unread)
    _, grads = loss_and_grads(model, *_data())
    assert any(g.isnan().any() for g in grads.values())


def test_skipped_outputs_outside_a_recompute_are_computed():
    model = _model()
    x = torch.randn(3, CFG.hidden_size)
    layer = model.model.layers[0].mlp.down_proj
    with recompute.output_unused():
        y = model.model.layers[0].self_attn.q_proj(x)
    assert not y.isnan().any()
    with recompute.recomputing(), recompute.output_unused():
        assert recompute.skip()
        assert layer(torch.randn(3, CFG.intermediate_size)).shape == (3, CFG.hidden_size)
    assert not recompute.skip()


@pytest.mark.parametrize("policy,plain", [("selective", 1), ("offloaded", 1), ("keep_attention", 9)])
def test_plain_layers_need_a_layer_policy_and_a_layer_count(policy, plain):
    with pytest.raises(ValueError, match="plain_layers"):
        _model().set_recompute(policy, plain_layers=plain)


@pytest.mark.parametrize("policy,plain,kept", [("keep_attention", 0, 1), ("full", L, 1), ("full", 0, L + 1)])
def test_attention_layers_need_full_and_a_layer_count(policy, plain, kept):
    with pytest.raises(ValueError, match="attention_layers"):
        _model().set_recompute(policy, plain_layers=plain, attention_layers=kept)
