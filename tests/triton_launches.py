"""Every Triton kernel launch of longseq's wrappers as a GPU run makes it, on CPU tensors, for tests/triton_compile.py.

Each wrapper is called as the model, the engine and the sampler call it on a GPU: each dtype it accepts, each
constexpr branch (FP8 pools, a bias, the residual add, backward's gradients, split keys, split K, ...), head sizes and
vocabularies that change a tile, and every config of an autotuned kernel. The launches are recorded, never run, so
no output is ever read (the kernels' results are covered by their own tests against the reference paths).

The wrappers pick a GPU's tiling where the tensor is on a GPU; here the inputs are `OnGpu` CPU tensors (is_cuda
True), `elements_per_program` gives the GPU's share and the device has an H100's SM count, so their CUDA branches run.
"""

from __future__ import annotations

import sys
import types

import torch

import longseq.models.kernels as kernels

SMS = 132  # streaming multiprocessors of an H100 SXM / H200
FLOATS = (torch.bfloat16, torch.float16, torch.float32)
HALVES = (torch.bfloat16, torch.float16)  # the quantized layers' kernels take 16-bit activations only
FP8 = torch.float8_e4m3fn


class OnGpu(torch.Tensor):
    """A CPU tensor that answers is_cuda like a GPU one, so that a wrapper takes its GPU branch (ops on it stay
    OnGpu; new tensors a wrapper allocates on its device are plain CPU tensors)."""

    @property
    def is_cuda(self) -> bool:
        return True


def gpu(*shape: int, dtype: torch.dtype = torch.float32) -> OnGpu:
    return torch.zeros(*shape, dtype=dtype).as_subclass(OnGpu)


def _as_on_gpu() -> None:
    """The wrappers' device queries as on an H100 (imports of the kernel modules come after: they bind
    elements_per_program by name)."""
    kernels.elements_per_program = lambda device, on_gpu: on_gpu
    torch.cuda.get_device_properties = lambda device=None: types.SimpleNamespace(multi_processor_count=SMS)


def kv_write() -> None:
    from longseq.attention.kernels.kv_write import write_kv

    for heads, dim in ((8, 128), (2, 64), (3, 64)):  # H * D a power of 2 or not (HD_PAD)
        for dtype, pool_dtype in [(d, d) for d in FLOATS] + [(d, FP8) for d in HALVES]:
            pool = gpu(256, heads, dim, dtype=pool_dtype)
            for n in (1, 5):  # a decode step's new tokens, a prefill's: views of (1, H_kv, N, D) as (N, H_kv, D)
                k = gpu(1, heads, n, dim, dtype=dtype)[0].transpose(0, 1)
                scales = gpu(2) if pool_dtype == FP8 else None
                write_kv(pool, pool.clone(), k, k.clone(), gpu(n, dtype=torch.int64), scales)


def paged_decode() -> None:
    from longseq.attention.kernels.paged_decode import paged_decode

    for dtype, pool_dtype in [(d, d) for d in FLOATS] + [(d, FP8) for d in HALVES]:
        for heads, kv_heads, dim in ((32, 8, 128), (9, 3, 64), (16, 16, 64), (64, 8, 128)):  # GQA, MHA, groups > 16
            for block_size, splits, window in ((16, 1, None), (16, 4, None), (32, 1, 4096), (16, 16, 4096)):
                q = gpu(1, heads, 3, dim, dtype=dtype)[0].transpose(0, 1)  # (B, H, D) of the step's (1, H, B, D)
                pool = gpu(1024, kv_heads, dim, dtype=pool_dtype)
                scales = gpu(2) if pool_dtype == FP8 else None
                paged_decode(q, pool, pool.clone(), gpu(3, 64, dtype=torch.int32), gpu(3, dtype=torch.int32),
                             block_size, window, splits, scales)


def sampler() -> None:
    from longseq.engine.kernels.gumbel_max import gumbel_max
    from longseq.engine.kernels.top_p import top_p_cut

    for vocab in (128256, 49152, 1000, 100):  # Llama 3's, SmolLM2's, tiny models' (one chunk)
        for batch in (1, 4, 64):  # a batch of 32 or more takes fewer thresholds per search pass
            logits = gpu(batch, vocab)
            f32, i64 = gpu(batch), gpu(batch, dtype=torch.int64)
            gumbel_max(logits, f32, f32, f32, i64, i64, i64)
            for candidate in (None, i64):
                top_p_cut(logits, f32, f32, f32, i64, candidate)
    logits = gpu(2, 1000)  # the kernel tests' small tiling, when they run on a GPU (LONGSEQ_TEST_CUDA=1)
    f32, i64 = gpu(2), gpu(2, dtype=torch.int64)
    gumbel_max(logits, f32, f32, f32, i64, i64, i64, block=64, blocks_per_chunk=2)
    top_p_cut(logits, f32, f32, f32, i64, i64, thresholds=4, block=64, blocks_per_chunk=2, num_warps=2)


def gemv() -> None:
    from longseq.models.kernels.gemv import gemv

    for dtype in HALVES:  # fused_linear.calibrate offers the GEMV to 16-bit weights only
        for bias in (None, gpu(1024, dtype=dtype)):
            gemv(gpu(1, 1, 4096, dtype=dtype), gpu(1024, 4096, dtype=dtype), bias)


def lora() -> None:
    from longseq.models.kernels.lora import lora_shrink_expand
    from longseq.models.lora_batched import LoRABatch

    for dtype in FLOATS:
        for sizes, rank in (([4096, 1024, 1024], 16), ([4096], 8), ([14336, 14336], 64), ([576, 192, 192], 8)):
            for tokens in (3, 200):  # decode splits K, a prefill does not
                slots = torch.arange(tokens) % 3 - 1  # some rows on the base model (-1)
                built = LoRABatch.build(slots, num_slots=4)
                batch = LoRABatch(*(gpu(*t.shape, dtype=t.dtype) for t in (built.slots, built.order, built.block_slot,
                                                                          built.block_start, built.block_rows)))
                x = gpu(tokens, 4096, dtype=dtype)
                a = gpu(4, len(sizes) * rank, 4096, dtype=dtype)
                b = gpu(4, rank, sum(sizes), dtype=dtype)
                lora_shrink_expand(gpu(tokens, sum(sizes), dtype=dtype), x, a, b, batch, sizes, rank)


def norms_and_activations() -> None:
    from longseq.models.kernels.rms_norm import add_rms_norm, rms_norm
    from longseq.models.kernels.rope import rope
    from longseq.models.kernels.swiglu import swiglu

    for dtype in FLOATS:
        for dim in (4096, 576):  # a power of 2 or not (BLOCK pads the row)
            for w_dtype in {dtype, torch.float32}:  # the norm's weight in the model's dtype, or kept in float32
                for need_x, need_w in ((True, True), (True, False), (False, True)):  # LoRA: frozen weights
                    x = gpu(2, 7, dim, dtype=dtype).requires_grad_(need_x)
                    w = gpu(dim, dtype=w_dtype).requires_grad_(need_w)
                    rms_norm(x, w, 1e-5).sum().backward()
                add_rms_norm(gpu(2, 7, dim, dtype=dtype), gpu(2, 7, dim, dtype=dtype), gpu(dim, dtype=w_dtype), 1e-6)
        for heads, kv_heads, dim in ((32, 8, 128), (9, 3, 64), (4, 4, 96)):
            q = gpu(2, heads, 7, dim, dtype=dtype).transpose(1, 2).requires_grad_()  # (B, S, H, D) views
            k = gpu(2, kv_heads, 7, dim, dtype=dtype).transpose(1, 2).requires_grad_()
            cos = gpu(1, 7, dim, dtype=dtype)
            qo, ko = rope(q, k, cos, cos.clone())
            (qo.sum() + ko.sum()).backward()
        for fused_matmul in (False, True):  # gate and up: separate tensors or column halves of one matmul
            gate_up = gpu(2, 7, 2 * 1536, dtype=dtype)
            gate, up = gate_up.chunk(2, -1) if fused_matmul else (gpu(2, 7, 1536, dtype=dtype),) * 2
            swiglu(gate.requires_grad_(), up).sum().backward()


def quantized() -> None:
    from longseq.models.quant.fp8_kernel import fp8_gemv, quantize_rows_triton
    from longseq.models.quant.int4_kernel import int4_dequantize, int4_dequantize_tinygemm, int4_gemv, int4_matmul
    from longseq.models.quant.int8_kernel import int8_dequantize, int8_gemv

    for dtype in FLOATS:
        quantize_rows_triton(gpu(5, 4096, dtype=dtype))
        quantize_rows_triton(gpu(1, 576, dtype=dtype))
        int8_dequantize(gpu(1024, 4096, dtype=torch.int8), gpu(1024, 128, dtype=torch.float16), dtype)
        for group in (32, 128, 256):
            scales = gpu(1024, 4096 // group, dtype=dtype)
            int4_dequantize(gpu(1024, 2048, dtype=torch.uint8), scales, scales.clone(), group, dtype)
    for tiles in (2, 4, 8):  # tinygemm's layout (bf16 only): (N/8, K/(16 tiles), 32, tiles/2) int32 words
        for group in (32, 128, 256):
            packed = gpu(1024 // 8, 4096 // (16 * tiles), 32, tiles // 2, dtype=torch.int32)
            int4_dequantize_tinygemm(packed, gpu(4096 // group, 1024, 2, dtype=torch.bfloat16), group, torch.bfloat16)
    for dtype in HALVES:
        x = gpu(1, 4096, dtype=dtype)
        fp8_gemv(x, gpu(1024, 4096, dtype=FP8), gpu(1024))
        int8_gemv(x, gpu(1024, 4096, dtype=torch.int8), gpu(1024, 128, dtype=torch.float16))
        for group in (32, 128, 256):
            scales = gpu(1024, 4096 // group, dtype=dtype)
            qweight = gpu(1024, 2048, dtype=torch.uint8)
            int4_gemv(x, qweight, scales, scales.clone(), group)
            for rows in (4, 32):
                for splits in (None, 1):  # split-K's atomic adds, or one split storing y itself
                    int4_matmul(gpu(rows, 4096, dtype=dtype), qweight, scales, scales.clone(), group, splits)


def launch_all() -> None:
    _as_on_gpu()
    for run in (kv_write, paged_decode, sampler, gemv, lora, norms_and_activations, quantized):
        run()
    tiling = kernels.elements_per_program
    stale = [name for name, module in list(sys.modules.items())
             if name.startswith("longseq.") and getattr(module, "elements_per_program", tiling) is not tiling]
    assert not stale, f"imported before _as_on_gpu, these launched with the CPU tiling: {stale}"
