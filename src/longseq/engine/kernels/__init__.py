"""Triton kernels of the serving engine. Each is imported only when its wrapper runs on a GPU (or under
TRITON_INTERPRET=1 in tests)."""
