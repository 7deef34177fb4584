"""The planner's activation model of tiled and offloaded recompute against longseq's own training step, on CPU.

A tiny random Llama (the 8B's proportions: intermediate 3.5·d, GQA 4:1, tiles of 1/16 of the sequence) trained by
train/loop.py `_train_step` (bf16 autocast, TokenLoss, chunked loss, SGD) with recompute full + tiled norms/MLPs,
and with layer inputs offloaded (models/offload.py: on CPU the "host copy" is a plain copy into pooled buffers,
the same code path). Measured against the planner:
- saved: storages packed by saved-tensor hooks (ours around the step, plus the offloader's own), by data_ptr;
- resident after forward: every storage alive when the step's forward returns (the held layer-0 input included);
- the step's peak and the live bytes at each layer's attention backward (outputs included).
CPU kernels allocate no FlashAttention workspace, so the planner runs with kernel_workspace=False here.
"""

from types import SimpleNamespace

import pytest
import torch
from memtrack import LiveBytes, build, model_storages

from longseq.config import ModelConfig, TrainConfig
from longseq.plan.activations import ActivationSetup, activation_peak, saved_bytes
from longseq.plan.models import ModelSpec
from longseq.train.loop import _train_step
from longseq.train.optim import build_optimizer
from longseq.train.precision import resolve_precision
from longseq.train.step import TokenLoss

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LLAMA = ModelConfig(vocab_size=512, hidden_size=256, intermediate_size=896, num_layers=3, num_heads=4, num_kv_heads=1)
SEQ, TILE, CHUNK = 4096, 256, 1024
SDPA_BACKWARD = "attention_for_cpu_backward"
CASES = [("lora", "full", 0), ("lora", "offloaded", 1), ("lora", "offloaded", 0), ("qlora", "offloaded", 1)]


def _step(method: str, policy: str, keep: int):
    model = build(LLAMA, method, "full", ALL)
    model.set_recompute(policy, keep_on_gpu=keep)
    model.set_tiling(TILE)
    cfg = TrainConfig(method=method, optimizer="sgd", loss_chunk=CHUNK, lora_rank=16, lora_alpha=32)
    cpu = torch.device("cpu")
    precision, optimizer = resolve_precision("bf16", cpu), build_optimizer(model, cfg, cpu)
    step_model = TokenLoss(model, CHUNK)
    ids = torch.randint(0, LLAMA.vocab_size, (1, SEQ), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(SEQ).expand(1, SEQ).contiguous()

    def batch():  # targets made inside the tracker: the planner counts them (the loss saves them), not ids/positions
        return SimpleNamespace(input_ids=ids, targets=torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], 1),
                               positions=positions, doc_ids=None)

    def run():
        _train_step(step_model, [batch()], cfg, precision, cpu, optimizer, None)

    return model, step_model, optimizer, precision, run, batch


def _skip(model, optimizer) -> set[int]:
    """Weights, optimizer states and the offloader's pooled host buffers: not activations."""
    skip = model_storages(model)
    skip.update(s.untyped_storage().data_ptr() for state in optimizer.state.values() for s in state.values()
                if isinstance(s, torch.Tensor))
    if model.offloader is not None:
        skip.update(b.untyped_storage().data_ptr() for bufs in model.offloader._pool.values() for b in bufs)
    return skip


@pytest.mark.parametrize("method,policy,keep", CASES, ids=lambda c: str(c))
def test_tiled_offloaded_step_matches_planner(method, policy, keep):
    if method == "qlora":
        pytest.importorskip("torchao")
    model, step_model, optimizer, precision, run, batch = _step(method, policy, keep)
    run()  # warm-up: SGD momentum buffers and the offloader's host buffers exist from now on
    spec = ModelSpec("tiny", LLAMA)
    st = ActivationSetup(method=method, recompute=policy, seq_len=SEQ, loss_chunk=CHUNK, keep_hidden=False,
                         mlp_tile=TILE, offload_keep=keep, fused=False)
    plan = activation_peak(spec, st, kernel_workspace=False)

    # Saved for backward: our hooks see what stays on the device; inside offloaded layers the offloader's hooks
    # pack instead (a handle: sent to the host; a tensor: kept, e.g. RoPE cos/sin).
    skip = _skip(model, optimizer)
    device, host = {}, []  # host: one entry per offloaded tensor (its device memory is freed, its address reused)

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in skip and s.nbytes():
            device[s.data_ptr()] = s.nbytes()
        return t

    if model.offloader is not None:
        inner = model.offloader._pack

        def counting_pack(t):
            packed = inner(t)
            if isinstance(packed, torch.Tensor):
                device[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            else:
                host.append(t.nbytes)
            return packed

        model.offloader._pack = counting_pack
    b = batch()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), precision.autocast():
        loss = step_model(b.input_ids, b.positions, None, b.targets)
    loss.backward()  # hands the offloader's host buffers back to its pool
    if model.offloader is not None:
        model.offloader._pack = inner
    predicted_saved = sum(saved_bytes(spec, st).values())
    assert sum(device.values()) + sum(host) == pytest.approx(predicted_saved, rel=0.01)
    assert sum(host) == pytest.approx(plan.host, rel=0.01)

    # Live bytes through one whole step (warm step: nothing is allocated once and kept).
    optimizer.zero_grad(set_to_none=True)
    tracker = LiveBytes(_skip(model, optimizer), mark=SDPA_BACKWARD)
    after_forward = []
    hook = step_model.register_forward_hook(lambda *_: after_forward.append(tracker.live))
    with tracker:
        run()
    hook.remove()
    # Resident after forward: saved on the device plus the layer-0 input an offloaded leaf holds.
    assert after_forward[0] == pytest.approx(plan.saved, rel=0.01), (after_forward[0], plan.saved)
    events = plan.events
    assert tracker.marks[0] == pytest.approx(events["attention backward, last layer"], rel=0.03)
    top = "attention backward, last offloaded layer"
    if top in events:
        offloaded = LLAMA.num_layers - keep
        assert tracker.marks[LLAMA.num_layers - offloaded] == pytest.approx(events[top], rel=0.03)
    assert tracker.peak == pytest.approx(plan.peak + plan.grads, rel=0.03), (plan.phase, tracker.peak,
                                                                            plan.peak + plan.grads)
