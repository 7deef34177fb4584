"""Triton kernels for the model's row-wise and elementwise ops (RMSNorm, RoPE, SwiGLU), each an autograd Function
with its forward and backward fused. Imported only when `models.fused` dispatches to them: on a GPU, or on CPU under
TRITON_INTERPRET=1 in tests."""
