"""Triton kernels for the model's row-wise and elementwise ops (RMSNorm, RoPE, SwiGLU), each an autograd Function
with its forward and backward fused. Imported only when `models.fused` dispatches to them: on a GPU, or on CPU under
TRITON_INTERPRET=1 in tests."""


def elements_per_program(device, on_gpu: int) -> int:
    """Elements one kernel program takes: `on_gpu` on a GPU; far more on CPU, where Triton's interpreter pays per
    program, not per element."""
    return on_gpu if device.type == "cuda" else 1 << 16
