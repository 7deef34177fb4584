"""The planner's activation model of tiled and offloaded recompute against longseq's own training step, on CPU.

A tiny random Llama (the 8B's proportions: intermediate 3.5·d, GQA 4:1, tiles of 1/16 of the sequence) trained by
train/loop.py `train_step` (bf16 autocast, TokenLoss, chunked loss, SGD) with recompute full + tiled norms/MLPs,
and with layer inputs offloaded (models/offload.py: on CPU the "host copy" is a plain copy into pooled buffers,
the same code path). Measured against the planner:
- saved: storages packed by saved-tensor hooks (ours around the step, plus the offloader's own), by data_ptr;
- resident after forward: every storage alive when the step's forward returns;
- the step's peak and the live bytes at each layer's attention backward (outputs included; grouped attention, as
  long sequences run it: the largest over its groups' backward calls).
CPU kernels allocate no FlashAttention workspace, so the planner runs with kernel_workspace=False here.
"""

from types import SimpleNamespace

import pytest
import torch
from memtrack import LiveBytes, build, model_storages

from longseq.config import ModelConfig, TrainConfig
from longseq.plan.activations import activation_peak, saved_bytes
from longseq.plan.models import ModelSpec
from longseq.plan.setup import TrainSetup
from longseq.train.optim import build_optimizer
from longseq.train.precision import resolve_precision
from longseq.train.step import TokenLoss, train_step

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LLAMA = ModelConfig(vocab_size=512, hidden_size=256, intermediate_size=896, num_layers=3, num_heads=4, num_kv_heads=1)
GQA = ModelConfig(vocab_size=512, hidden_size=256, intermediate_size=896, num_layers=3, num_heads=8, num_kv_heads=2)
SEQ, TILE, CHUNK = 4096, 256, 1024
SDPA_BACKWARD = "attention_for_cpu_backward"
CASES = [("lora", "full", 0, LLAMA), ("lora", "offloaded", 1, LLAMA), ("lora", "offloaded", 0, LLAMA),
         ("qlora", "offloaded", 1, LLAMA), ("lora", "offloaded", 1, GQA)]


def _step(method: str, policy: str, keep: int, cfg_model: ModelConfig = LLAMA):
    model = build(cfg_model, method, "full", ALL)
    model.set_recompute(policy, keep_on_gpu=keep)
    model.set_tiling(TILE)
    cfg = TrainConfig(method=method, optimizer="sgd", loss_chunk=CHUNK, lora_rank=16, lora_alpha=32)
    cpu = torch.device("cpu")
    precision, optimizer = resolve_precision("bf16", cpu), build_optimizer(model, cfg, cpu)
    step_model = TokenLoss(model, CHUNK)
    ids = torch.randint(0, cfg_model.vocab_size, (1, SEQ), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(SEQ).expand(1, SEQ).contiguous()

    def batch():  # targets made inside the tracker: the planner counts them (the loss saves them), not ids/positions
        return SimpleNamespace(input_ids=ids, targets=torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], 1),
                               positions=positions, doc_ids=None)

    def run():
        train_step(step_model, [batch()], cfg, precision, cpu, optimizer, None)

    return model, step_model, optimizer, precision, run, batch


def _skip(model, optimizer) -> set[int]:
    """Weights, optimizer states and the offloader's pooled host buffers: not activations."""
    skip = model_storages(model)
    skip.update(s.untyped_storage().data_ptr() for state in optimizer.state.values() for s in state.values()
                if isinstance(s, torch.Tensor))
    if model.offloader is not None:
        skip.update(b.untyped_storage().data_ptr() for bufs in model.offloader._pool.values() for b in bufs)
    return skip


@pytest.mark.parametrize("method,policy,keep,cfg_model", CASES,
                         ids=[f"{m}-{p}-{k}-{'gqa' if c is GQA else 'mqa'}" for m, p, k, c in CASES])
def test_tiled_offloaded_step_matches_planner(monkeypatch, method, policy, keep, cfg_model):
    if method == "qlora":
        pytest.importorskip("torchao")
    from longseq.config import policy as config_policy

    # as long sequences run it (a no-op for one KV head)
    monkeypatch.setattr(config_policy, "ATTENTION_GROUP_TOKENS", SEQ)
    groups = config_policy.attention_groups(cfg_model.num_kv_heads, SEQ)
    model, step_model, optimizer, precision, run, batch = _step(method, policy, keep, cfg_model)
    run()  # warm-up: SGD momentum buffers and the offloader's host buffers exist from now on
    spec = ModelSpec("tiny", cfg_model)
    st = TrainSetup(method=method, recompute=policy, seq_len=SEQ, loss_chunk=CHUNK, keep_hidden=False,
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
    batch_ids = 2 * 8 * SEQ  # the step's copies of ids and positions: alive, not saved
    assert after_forward[0] == pytest.approx(plan.saved + batch_ids, rel=0.002), (after_forward[0], plan.saved)
    events = plan.events
    layers = cfg_model.num_layers
    assert len(tracker.marks) == layers * groups
    at = [max(tracker.marks[i * groups:(i + 1) * groups]) for i in range(layers)]  # backward order: last layer first
    # Grouped, CPU's backward kernels hold 1.1 MB (6.5-7.3%) less than the plan's dO + dQ/dK/dV pieces: the plan
    # stays on the safe side there.
    low = 0.08 if groups > 1 else 0.03
    last, top = "attention backward, last layer", "attention backward, last offloaded layer"
    assert events[last] * (1 - low) <= at[0] <= events[last] * 1.03
    if top in events:
        assert events[top] * (1 - low) <= at[keep] <= events[top] * 1.03
    # Peaks at an MLP backward, where the tiny model's measured peak is above the plan by 1.8% to 3.3% (0.5 to
    # 0.8 MB: up to one layer's adapter gradients more than the plan's third of a layer; 0.33 MB, 1.3% here).
    assert tracker.peak == pytest.approx(plan.peak + plan.grads, rel=0.04), (plan.phase, tracker.peak,
                                                                            plan.peak + plan.grads)
