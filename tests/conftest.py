"""Test-session setup shared by every test file."""

import os

# Triton kernels run under Triton's CPU interpreter in CI. `triton.jit` reads this when a kernel module (and
# triton.language itself) is first imported, so it is set before any test imports them. LONGSEQ_TEST_CUDA=1 runs the
# kernel tests compiled on a GPU instead.
if os.environ.get("LONGSEQ_TEST_CUDA") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")
