"""Tiled RMSNorm / MLP and offloaded layer checkpoints compute the same loss and gradients as the plain path."""

import pytest
import torch

from longseq.config import ModelConfig, TrainConfig
from longseq.models.llama import MLP, CausalLM, RMSNorm
from longseq.models.offload import LayerInputOffloader
from longseq.models.tiling import tiled_mlp, tiled_rms_norm
from longseq.train.lora import LoRALinear, apply_lora
from tiny_models import loss_and_grads

CFG = ModelConfig(vocab_size=96, hidden_size=64, intermediate_size=160, num_layers=3, num_heads=4, num_kv_heads=2,
                  max_seq_len=128)


def _grads(fn, *tensors):
    out = fn()
    g = torch.randn_like(out, generator=torch.Generator().manual_seed(5))
    return out.detach(), torch.autograd.grad(out, tensors, g)


@pytest.mark.parametrize("tile", [1, 5, 16, 1000])
def test_tiled_rms_norm_equals_plain(tile):
    torch.manual_seed(0)
    norm = RMSNorm(48, 1e-5).double()
    with torch.no_grad():
        norm.weight.normal_(1, 0.3)
    x = torch.randn(2, 17, 48, dtype=torch.float64, requires_grad=True)
    ref, g_ref = _grads(lambda: norm(x), x, norm.weight)
    out, g_out = _grads(lambda: tiled_rms_norm(x, norm.weight, norm.eps, tile), x, norm.weight)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(g_out, g_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_tiled_rms_norm_bf16_input_fp32_weight_matches_plain_rounding():
    # Full fine-tuning under autocast: fp32 weight, bf16 activations. The forward must round exactly as the plain one.
    torch.manual_seed(0)
    norm = RMSNorm(64, 1e-6)
    x = torch.randn(40, 64).bfloat16().requires_grad_()
    ref, g_ref = _grads(lambda: norm(x), x, norm.weight)
    out, g_out = _grads(lambda: tiled_rms_norm(x, norm.weight, norm.eps, 8), x, norm.weight)
    assert out.dtype == ref.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    torch.testing.assert_close(g_out[0], g_ref[0], rtol=2e-2, atol=2e-2)  # bf16 gradient, fp32 maths in both
    torch.testing.assert_close(g_out[1], g_ref[1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_tiled_mlp_equals_plain_with_lora(dropout):
    torch.manual_seed(0)
    mlp = MLP(CFG).double()
    for name in ("gate_proj", "up_proj", "down_proj"):
        lora = LoRALinear(getattr(mlp, name), rank=4, alpha=8, dropout=dropout).double()
        torch.nn.init.normal_(lora.lora_B.weight, 0, 0.1)
        setattr(mlp, name, lora)
    params = [p for p in mlp.parameters() if p.requires_grad]
    assert len(params) == 6
    x = torch.randn(3, 11, 64, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(7)
    # With dropout the masks are drawn tile by tile: the reference is the same tiles through plain autograd, and
    # the check is that backward's recompute draws the masks the forward drew.
    plain = lambda: torch.cat([mlp(r) for r in x.reshape(-1, 64).split(4)]).view(3, 11, 64)  # noqa: E731
    ref, g_ref = _grads(plain, x, *params)
    torch.manual_seed(7)
    out, g_out = _grads(lambda: tiled_mlp(mlp.forward, x, params, 4), x, *params)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(g_out, g_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_tiled_mlp_gives_parameter_grads_when_input_needs_none():
    # A frozen path into the MLP (LoRA on the MLP only, layer 0): the adapters must still get gradients.
    torch.manual_seed(0)
    mlp = MLP(CFG)
    x = torch.randn(1, 9, 64)
    params = [mlp.up_proj.weight]
    for p in mlp.parameters():
        p.requires_grad_(p is mlp.up_proj.weight)
    (tiled_mlp(mlp.forward, x, params, 2).square().sum()).backward()
    got = mlp.up_proj.weight.grad.clone()
    mlp.up_proj.weight.grad = None
    mlp.forward(x).square().sum().backward()
    torch.testing.assert_close(got, mlp.up_proj.weight.grad, rtol=1e-5, atol=1e-5)


def _model(lora: bool, dtype=torch.float64):
    torch.manual_seed(0)
    model = CausalLM(CFG)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    if lora:
        apply_lora(model, TrainConfig(lora_rank=4))
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, LoRALinear) and m.rank:
                    m.lora_B.weight.normal_(0, 0.1)
    return model.to(dtype)


@pytest.mark.parametrize("policy,keep,tile", [("full", 0, 8), ("offloaded", 0, None), ("offloaded", 1, 8),
                                              ("offloaded", 0, 8), ("offloaded", 5, 3)])
@pytest.mark.parametrize("lora", [False, True])
def test_long_context_techniques_are_exact(policy, keep, tile, lora):
    model = _model(lora)
    ids = torch.randint(0, CFG.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    targets = torch.roll(ids, -1, 1)
    ref_loss, ref_grads = loss_and_grads(model, ids, targets)
    model.set_recompute(policy, keep_on_gpu=keep)
    model.set_tiling(tile)
    loss, grads = loss_and_grads(model, ids, targets)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
    assert grads.keys() == ref_grads.keys() and grads
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-9, atol=1e-10, msg=name)
    if policy == "offloaded" and keep < CFG.num_layers:
        assert model.offloader.host_bytes == (CFG.num_layers - keep) * ids.numel() * CFG.hidden_size * 8
    # a second step reuses the host buffers instead of allocating new ones
    if model.offloader is not None:
        before = model.offloader.host_bytes
        loss2, _ = loss_and_grads(model, ids, targets)
        assert model.offloader.host_bytes == before and torch.equal(loss2, loss)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("keep", [0, 2])
def test_reserved_host_buffers_are_the_ones_a_step_uses(dtype, keep):
    # reserve_offload allocates before the first step what that step would: the step allocates nothing more
    model = _model(lora=True, dtype=dtype)
    model.set_recompute("offloaded", keep_on_gpu=keep)
    model.reserve_offload(2, 40)
    reserved = model.offloader.host_bytes
    assert reserved == (CFG.num_layers - keep) * 2 * 40 * CFG.hidden_size * torch.finfo(dtype).bits // 8
    ids = torch.randint(0, CFG.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    loss_and_grads(model, ids, torch.roll(ids, -1, 1))
    assert model.offloader.host_bytes == reserved
    model.reserve_offload(2, 40)  # again: the pool already holds them
    assert model.offloader.host_bytes == reserved


def test_offloaded_packed_documents_exact():
    model = _model(lora=True)
    ids = torch.randint(0, CFG.vocab_size, (1, 30), generator=torch.Generator().manual_seed(2))
    doc_ids = torch.tensor([[0] * 12 + [1] * 18])
    positions = torch.cat([torch.arange(12), torch.arange(18)])[None]
    targets = torch.roll(ids, -1, 1)
    ref = loss_and_grads(model, ids, targets, doc_ids, positions)
    model.set_recompute("offloaded")
    model.set_tiling(4)
    got = loss_and_grads(model, ids, targets, doc_ids, positions)
    torch.testing.assert_close(got[0], ref[0], rtol=1e-12, atol=1e-12)
    for name in ref[1]:
        torch.testing.assert_close(got[1][name], ref[1][name], rtol=1e-9, atol=1e-10)


def test_offloader_keeps_shared_and_small_tensors_in_place():
    off = LayerInputOffloader(min_bytes=64)
    small, shared, big = torch.ones(4), torch.ones(100), torch.ones(100)
    off._keep = {shared.data_ptr()}
    assert off._pack(small) is small and off._pack(shared) is shared
    h = off._pack(big)
    assert not isinstance(h, torch.Tensor)
    big.add_(1)  # the host copy was taken at pack time
    torch.testing.assert_close(off._unpack(h), torch.ones(100))


def test_inference_ignores_tiling_and_offload():
    model = _model(lora=False, dtype=torch.float32)
    ids = torch.randint(0, CFG.vocab_size, (1, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model(ids)
        model.set_recompute("offloaded")
        model.set_tiling(4)
        torch.testing.assert_close(model(ids), ref)
    assert model.offloader.host_bytes == 0
