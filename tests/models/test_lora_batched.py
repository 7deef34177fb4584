"""Batched LoRA (models/lora_batched.py): the row blocks LoRABatch groups a step's tokens into, the torch reference
against a per-token loop, and the Triton shrink / expand kernels (models/kernels/lora.py) against the reference:
under Triton's CPU interpreter in CI, compiled on a GPU with LONGSEQ_TEST_CUDA=1 (there in bfloat16 too)."""

import os

import pytest
import torch

from longseq.models.fused_linear import FusedLinear
from longseq.models.lora_batched import BLOCK_M, BatchedLoRA, LoRABatch, LoRAState, lora_add_reference

ON_GPU = os.environ.get("LONGSEQ_TEST_CUDA") == "1" and torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
DTYPES = [torch.float32, torch.bfloat16] if ON_GPU else [torch.float32]


def pool(num_slots: int, rank: int, k: int, sizes: list[int], dtype=torch.float32, device=DEVICE, seed=0):
    """a (S, n·R, K) and b (S, R, out) as strided views into one flat storage, as the engine's pool holds them."""
    g = torch.Generator().manual_seed(seed)
    n_a, n_b = len(sizes) * rank * k, rank * sum(sizes)
    flat = (torch.randn(num_slots, n_a + n_b + 7, generator=g) * 0.5).to(device, dtype)
    a = flat[:, :n_a].unflatten(1, (len(sizes) * rank, k))
    b = flat[:, n_a + 7 :].unflatten(1, (rank, sum(sizes)))
    return a, b


def per_token(y, x, a, b, slots, sizes, rank):
    """The definition, one token at a time, in float64."""
    out = y.double().clone()
    for t, s in enumerate(slots.tolist()):
        if s < 0:
            continue
        start = 0
        for i, size in enumerate(sizes):
            xa = x[t].double() @ a[s, i * rank : (i + 1) * rank].double().T
            out[t, start : start + size] += xa @ b[s, :, start : start + size].double()
            start += size
    return out


@pytest.mark.parametrize("n", [0, 1, 5, 16, 17, 40, 300])
@pytest.mark.parametrize("num_slots", [1, 3, 64])
def test_row_blocks_cover_every_adapter_token_once(n, num_slots):
    g = torch.Generator().manual_seed(n)
    slots = torch.randint(-1, num_slots, (n,), generator=g)
    batch = LoRABatch.build(slots, num_slots)
    seen = []
    for s, start, rows in zip(batch.block_slot.tolist(), batch.block_start.tolist(), batch.block_rows.tolist(),
                              strict=True):
        assert 0 <= rows <= BLOCK_M
        for t in batch.order[start : start + rows].tolist():
            assert slots[t] == s
            seen.append(t)
    assert sorted(seen) == sorted((slots >= 0).nonzero().flatten().tolist())


@pytest.mark.parametrize("sizes", [[64], [64, 32, 32], [96, 96]])
def test_reference_equals_the_per_token_definition(sizes):
    a, b = pool(4, 8, 48, sizes, torch.float64, "cpu")
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(30, 48, generator=g, dtype=torch.float64), torch.randn(30, sum(sizes), generator=g,
                                                                               dtype=torch.float64)
    slots = torch.randint(-1, 4, (30,), generator=g)
    expected = per_token(y, x, a, b, slots, sizes, 8)
    lora_add_reference(y, x, a, b, slots, sizes, 8)
    torch.testing.assert_close(y, expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 7, 33, 130])
@pytest.mark.parametrize("case", [
    (1, 16, 64, [64]),  # one slot, the smallest rank
    (5, 8, 96, [64, 32, 32]),  # q/k/v, a rank padded to 16 in the kernel
    (3, 64, 80, [128, 128]),  # gate/up at the largest rank: several rank blocks in the shrink
    (70, 4, 64, [48]),  # more slots than tokens
])
def test_kernels_equal_the_reference(dtype, n, case):
    from longseq.models.kernels.lora import lora_shrink_expand

    num_slots, rank, k, sizes = case
    a, b = pool(num_slots, rank, k, sizes, dtype)
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, k, generator=g).to(DEVICE, dtype)
    y = torch.randn(n, sum(sizes), generator=g).to(DEVICE, dtype)
    slots = torch.randint(-1, num_slots, (n,), generator=g).to(DEVICE)
    before, expected = y.clone(), y.clone()
    lora_add_reference(expected, x, a, b, slots, sizes, rank)
    lora_shrink_expand(y, x, a, b, LoRABatch.build(slots, num_slots), sizes, rank)
    base = slots < 0
    assert torch.equal(y[base], before[base])  # the base's rows are not touched at all
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(y.float(), expected.float(), atol=tol * expected.abs().max().item(), rtol=tol)


def test_fused_linear_adds_the_adapter_deltas_in_place_before_the_split():
    g = torch.Generator().manual_seed(2)
    linears = [torch.nn.Linear(32, n, bias=False).double() for n in (32, 16, 16)]
    fused = FusedLinear(linears)
    a, b = pool(2, 4, 32, [32, 16, 16], torch.float64, "cpu", seed=3)
    state = LoRAState()
    fused.lora = BatchedLoRA(a, b, [32, 16, 16], 4, state)
    x = torch.randn(1, 5, 32, generator=g, dtype=torch.float64)
    base = [t.clone() for t in fused(x)]  # no step state: the base alone
    slots = torch.tensor([0, -1, 1, 1, 0])
    state.batch = LoRABatch.build(slots, 2)
    got = torch.cat(fused(x), -1)[0]
    expected = per_token(torch.cat(base, -1)[0], x[0], a, b, slots, [32, 16, 16], 4)
    torch.testing.assert_close(got, expected)
