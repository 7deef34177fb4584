"""Int4 weight-only linear layers: 4-bit weights with a scale and a zero point per group of input channels.

W[n, k] ≈ (q[n, k] - z[n, g]) · s[n, g] for g = k // group_size: asymmetric round-to-nearest at load from 16-bit
weights, or GPTQ / AWQ checkpoints unpacked into the same layout (models/quant/checkpoint.py). Storage, the layout
PyTorch's tinygemm kernel takes as input (`_convert_weight_to_int4pack`): `qweight` (N, K/2) uint8, byte j of a row
holding k = 2j in its high nibble and k = 2j + 1 in its low one; `scales` and `zeros` (N, K/G) in the model's dtype
(zeros are the integers 0..15). GPTQ's act-order checkpoints store input channels out of group order (`g_idx`):
their columns are sorted by group at load and each input row is permuted the same way at run time (`perm`), so
every group stays one contiguous run of K (ExLlama's and vLLM's reordering).

Compute on GPUs, inputs of up to DECODE_ROWS rows (decode): a layer built on a GPU with bf16 scales keeps only
PyTorch's tinygemm layout (int4_tinygemm.py, converted once in the constructor) and runs `_weight_int4pack_mm`;
other layers (fp16, GGUF's float32 scales, sizes tinygemm refuses) keep int4.py's layout and run the Triton kernels
(int4_kernel.py: a GEMV for one row, a tl.dot kernel beyond), which dequantize each tile in registers. Either way a
step reads 4 bits a weight. Longer inputs (prefill) dequantize the weight to 16 bits in one Triton pass from
whichever layout the layer keeps and run one cuBLAS matmul: the dequantize costs the weight's bytes once per step,
beside a matmul of hundreds of rows. One layout per layer: tinygemm's can be dequantized directly (its nibble order
is fixed arithmetic), so no second copy is kept for prefill. The reference (`reference_linear`: dequantize, float32
matmul) is the CPU path and the tests' oracle.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from longseq.errors import LongseqError
from longseq.models.quant import int4_tinygemm
from longseq.models.quant.nibbles import pack, unpack  # noqa: F401  (int4.pack / int4.unpack: the layout's names)

# Inputs of at most this many rows take the decode kernels on GPUs (tinygemm, or the Triton ones); longer ones
# dequantize and run cuBLAS. 16 is tinygemm's m-tile: it reads the whole weight once per 16 rows, so beyond that its
# cost doubles while a dequantize's stays. An estimate; benchmarks/quant_kernels.py times 1, 8, 16 and 32 rows.
DECODE_ROWS = 16


def fitting_group(in_features: int, group_size: int) -> int:
    """`group_size`, or for an input size it does not divide the largest smaller power of two down to 32 that does
    (SmolLM2's 576 inputs: 64 for 128)."""
    size = group_size
    while size >= 32:
        if in_features % size == 0:
            return size
        size //= 2
    raise LongseqError(f"int4 needs input sizes divisible by a group size of 32 or more; got {in_features} inputs")


def quantize_weight(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, K) float -> packed (N, K/2) uint8, float32 scales and zeros (N, K/G): per group, the range [min, max]
    (widened to hold 0.0, as GPTQ does) mapped onto 0..15, the zero point the integer nearest to where 0.0 falls."""
    N, K = weight.shape
    w = weight.float().reshape(N, K // group_size, group_size)
    lo, hi = w.amin(-1).clamp(max=0), w.amax(-1).clamp(min=0)
    scale = ((hi - lo) / 15).clamp(min=1e-8)  # (N, K/G)
    zero = (-lo / scale).round().clamp(0, 15)
    q = (w / scale[..., None]).round().add(zero[..., None]).clamp(0, 15)
    return pack(q.reshape(N, K)), scale, zero


def dequantize(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(N, K) in `dtype`: (q - z) · s group by group (computed in `dtype`: scales and zeros are stored in it), in
    place: the transient peak is the 16-bit weight and its unpacked bytes (3 bytes a weight in bf16)."""
    N, groups = scales.shape
    maths = torch.promote_types(dtype, scales.dtype)  # float32 scales (GGUF blocks) stay float32 until the end
    q = unpack(qweight).reshape(N, groups, -1).to(maths)
    return q.sub_(zeros.to(maths)[..., None]).mul_(scales.to(maths)[..., None]).reshape(N, -1).to(dtype)


def reference_linear(x: torch.Tensor, layer: Int4Linear) -> torch.Tensor:
    """Dequantize, then multiply in float32."""
    if layer.perm is not None:
        x = x[..., layer.perm]
    y = x.float() @ layer.dequantized().t()
    if layer.bias is not None:
        y = y + layer.bias.float()
    return y.to(x.dtype)


class Int4Linear(nn.Module):
    """A frozen linear layer with 4-bit weights: a layer swap for nn.Linear in serving (models/quant/__init__.py)."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                 bias: torch.Tensor | None = None, perm: torch.Tensor | None = None, tinygemm: bool | None = None):
        """qweight (N, K/2) uint8 (pack), scales / zeros (N, K/G) in the compute dtype, perm (K,): the input
        channel each stored column reads (act-order), or None. `tinygemm`: keep tinygemm's layout instead (None:
        where the weights are on a GPU and int4_tinygemm.fits). A layout already converted is taken as it is:
        qweight tinygemm's int32 (N/8, K / (16 tiles), 32, tiles/2), scales its scales_and_zeros, zeros None."""
        super().__init__()
        if qweight.dtype == torch.int32:  # already tinygemm's (a fused concatenation)
            assert zeros is None and scales.dim() == 3
            N, K = 8 * qweight.shape[0], qweight.shape[1] * 16 * 2 * qweight.shape[3]
            groups, layout = scales.shape[0], "tinygemm"
        else:
            N, half = qweight.shape
            assert qweight.dtype == torch.uint8 and scales.shape == zeros.shape and scales.shape[0] == N
            K, groups = 2 * half, scales.shape[1]
            fits = int4_tinygemm.fits(N, K, K // groups, scales.dtype)
            assert fits or not tinygemm, f"tinygemm cannot take a ({N}, {K}) layer, group {K // groups}, {scales.dtype}"
            if tinygemm is None:
                tinygemm = qweight.is_cuda and fits
            layout = "tinygemm" if tinygemm else "plain"
            if tinygemm:
                qweight, scales = int4_tinygemm.convert(qweight, scales, zeros)
                zeros = None
        self.out_features, self.in_features = N, K
        self.group_size = K // groups
        self.layout = layout
        self.register_buffer("qweight", qweight)
        # plain: scales and zeros (N, K/G); tinygemm: scales_and_zeros (K/G, N, 2)
        self.register_buffer("scales", None if layout == "tinygemm" else scales)
        self.register_buffer("zeros", zeros)
        self.register_buffer("scales_and_zeros", scales if layout == "tinygemm" else None)
        self.register_buffer("perm", None if perm is None else perm.long())
        # in the activations' dtype (the scales'), so every path returns that dtype and cuBLAS takes the bias
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(scales.dtype), requires_grad=False)

    @classmethod
    def quantize(cls, weight: torch.Tensor, group_size: int, bias: torch.Tensor | None = None,
                 dtype: torch.dtype | None = None, tinygemm: bool | None = None) -> Int4Linear:
        """From a float weight; scales and zeros stored in `dtype` (default: the weight's); `tinygemm` as in the
        constructor."""
        qweight, scale, zero = quantize_weight(weight, fitting_group(weight.shape[1], group_size))
        dtype = dtype or weight.dtype
        return cls(qweight, scale.to(dtype), zero.to(dtype), bias, tinygemm=tinygemm)

    def path(self, rows: int, dtype: torch.dtype, cuda: bool = True) -> str:
        """Which computation an input of `rows` rows in `dtype` takes: "reference" (CPU), "tinygemm", "gemv" or
        "tl.dot" (the Triton kernels), or "dequantize" (then cuBLAS)."""
        if not cuda:
            return "reference"
        if rows <= DECODE_ROWS:
            if self.layout == "tinygemm" and dtype == torch.bfloat16:
                return "tinygemm"
            if self.layout == "plain" and dtype in (torch.float16, torch.bfloat16):
                return "gemv" if rows == 1 else "tl.dot"
        return "dequantize"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        path = self.path(x.numel() // x.shape[-1], x.dtype, x.is_cuda)
        if path == "reference":
            return reference_linear(x, self)
        if self.perm is not None:
            x = x[..., self.perm]
        if path == "dequantize":
            from longseq.models.quant.int4_kernel import int4_dequantize, int4_dequantize_tinygemm

            if self.layout == "tinygemm":
                weight = int4_dequantize_tinygemm(self.qweight, self._sz(), self.group_size, x.dtype)
            else:
                weight = int4_dequantize(self.qweight, self.scales, self.zeros, self.group_size, x.dtype)
            return F.linear(x, weight, self.bias)
        if path == "tinygemm":
            y = int4_tinygemm.linear(x, self.qweight, self._sz(), self.group_size)
        else:
            from longseq.models.quant.int4_kernel import int4_gemv, int4_matmul

            if path == "gemv":
                y = int4_gemv(x, self.qweight, self.scales, self.zeros, self.group_size)
            else:
                y = int4_matmul(x.reshape(-1, self.in_features), self.qweight, self.scales, self.zeros,
                                self.group_size)
            y = y.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def _sz(self) -> torch.Tensor:
        # A layer fused into a larger one holds a column slice of its scales_and_zeros (fused); the kernels read
        # a contiguous (K/G, N, 2), so such a layer, called alone, copies its slice.
        sz = self.scales_and_zeros
        return sz if sz.is_contiguous() else sz.contiguous()

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(N, K) weight, columns in stored order (apply `perm` to inputs, or use `weight_in_input_order`)."""
        if self.layout == "tinygemm":
            return int4_tinygemm.dequantize(self.qweight, self.scales_and_zeros, dtype)
        return dequantize(self.qweight, self.scales, self.zeros, dtype)

    def weight_in_input_order(self) -> torch.Tensor:
        """The float32 (N, K) weight a plain nn.Linear would hold."""
        w = self.dequantized()
        if self.perm is None:
            return w
        out = torch.empty_like(w)
        out[:, self.perm] = w
        return out

    @staticmethod
    def fused(layers: list[nn.Module]):
        """fused_linear.fuse's hook: one int4 matmul over layers that read the same input (same group size, layout
        and input permutation); their buffers become views of the concatenation."""
        from longseq.models.quant import fuse_rows

        first = layers[0]
        if not all(type(m) is Int4Linear and not m._forward_hooks and m.group_size == first.group_size
                   and m.layout == first.layout and (m.bias is None) == (first.bias is None)
                   and _same(m.perm, first.perm) for m in layers):
            return None
        if first.layout == "tinygemm":
            return _fuse_tinygemm(layers)
        return fuse_rows(layers, ("qweight", "scales", "zeros"), lambda p, bias: Int4Linear(
            p["qweight"], p["scales"], p["zeros"], bias, first.perm, tinygemm=False))


def _fuse_tinygemm(layers: list[Int4Linear]):
    """fuse_rows for tinygemm's layout: the packed weights concatenate along their first dim (8 outputs a row),
    scales_and_zeros along its second; each layer keeps views (its scales_and_zeros a strided one, see _sz)."""
    from longseq.models.quant import FusedQuantLinear

    first = layers[0]
    if len(layers) == 1:
        return FusedQuantLinear(first, [first.out_features])
    packed = torch.cat([m.qweight for m in layers])  # (N/8, K / (16 tiles), 32, tiles/2)
    sz = torch.cat([m.scales_and_zeros for m in layers], dim=1)  # (K/G, N, 2)
    bias = None if first.bias is None else torch.cat([m.bias.detach() for m in layers])
    fused = Int4Linear(packed, sz, None, bias, first.perm)
    start = 0
    for m in layers:
        n = m.out_features
        m.qweight = packed[start // int4_tinygemm.N_TILE : (start + n) // int4_tinygemm.N_TILE]
        m.scales_and_zeros = sz[:, start : start + n]
        if bias is not None:
            m.bias.data = fused.bias.data[start : start + n]
        start += n
    return FusedQuantLinear(fused, [m.out_features for m in layers])


def _same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))
