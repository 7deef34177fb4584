"""Every Triton kernel that longseq launches compiles for an H100/H200 (sm_90), checked without a GPU.

The kernel tests run under Triton's interpreter, which accepts kernels the compiler refuses (a scalar redefined as a
block in a branch failed every candidate-path top-p launch on the H200 while CI passed). tests/triton_compile.py
compiles each wrapper's launches (tests/triton_launches.py) in a process without the interpreter: every distinct
launch through Triton's frontend and TTIR passes, each kernel's first one down to a cubin.
"""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import triton
    import triton.language as tl
except ImportError as e:
    pytest.skip(f"triton is not importable ({e}): no Triton kernel to compile", allow_module_level=True)

TESTS = Path(__file__).parent
SRC = TESTS.parent / "src" / "longseq"


@triton.jit
def _scalar_becomes_block(X, N, BLOCK: tl.constexpr):
    # The top-p `_cut` bug (fixed in 783a168): `ties` a scalar before the branch, a block inside it.
    ties = tl.load(X)
    if N > 0:
        ties = tl.load(X + tl.arange(0, BLOCK))
    tl.store(X, tl.sum(ties, 0))


@triton.jit
def _well_typed(X, N, BLOCK: tl.constexpr):
    ties = tl.load(X)
    if N > 0:
        ties = tl.sum(tl.load(X + tl.arange(0, BLOCK)), 0)
    tl.store(X, ties)


def launch() -> None:
    """The checker's own test (run by triton_compile.py, which records these launches, never running them)."""
    import torch

    x = torch.zeros(32, dtype=torch.int32)
    _scalar_becomes_block[(1,)](x, 5, BLOCK=32)
    _well_typed[(1,)](x, 5, BLOCK=32)


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> list[dict]:
    """triton_compile.py's answer for longseq's launches and this file's, from one process."""
    env = {**os.environ, "TRITON_CACHE_DIR": str(tmp_path_factory.mktemp("triton_cache")),
           "TRITON_DEFAULT_FP_FUSION": "1"}  # Triton 3.9 warns when it is unset
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, str(TESTS / "triton_compile.py"), __file__], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads(line) for line in proc.stdout.splitlines()]


def _ours(results: list[dict]) -> list[dict]:
    return [r for r in results if r["kernel"].startswith("longseq.")]


def test_every_kernel_compiles_for_sm90(results):
    failures = [f"{r['kernel']} [{r['variant']}]:\n    {r['error']}" for r in _ours(results) if r["error"]]
    assert not failures, f"{len(failures)} launches do not compile for sm_90:\n" + "\n".join(failures)


def launched_kernels() -> set[str]:
    """module.name of every @triton.jit function of src/longseq that some line launches (`k[grid](...)`, or an
    autotuned `triton.autotune(...)(k)` launched so), read from the source."""
    found = set()
    for path in SRC.rglob("*.py"):
        text = path.read_text()
        if "triton.jit" not in text:
            continue
        tree = ast.parse(text)
        jit = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)
               and any("triton.jit" in ast.unparse(d) for d in node.decorator_list)}
        tuned = {node.targets[0].id: node.value.args[0].id for node in tree.body
                 if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call)
                 and "triton.autotune" in ast.unparse(node.value.func) and isinstance(node.targets[0], ast.Name)}
        launched = {tuned.get(n.func.value.id, n.func.value.id) for n in ast.walk(tree)
                    if isinstance(n, ast.Call) and isinstance(n.func, ast.Subscript)
                    and isinstance(n.func.value, ast.Name)}
        module = ".".join(path.relative_to(SRC.parent).with_suffix("").parts)
        found |= {f"{module}.{name}" for name in launched & jit}
    return found


def test_every_launched_kernel_is_compiled(results):
    # A kernel added without a launch in triton_launches.py would pass unchecked.
    want = launched_kernels()
    assert len(want) >= 20
    missing = want - {r["kernel"] for r in _ours(results)}
    assert not missing, f"kernels launched by longseq that tests/triton_launches.py never launches: {sorted(missing)}"
    assert want <= {r["kernel"] for r in _ours(results) if r["through"] == "cubin"}  # the backend's stages too


def test_checker_reports_the_kernel_and_triton_message(results):
    mine = {r["kernel"].rsplit(".", 1)[1]: r["error"] for r in results if not r["kernel"].startswith("longseq.")}
    assert mine.keys() == {"_scalar_becomes_block", "_well_typed"}
    assert mine["_well_typed"] is None
    assert "initial value for `ties` is of type int32[]" in mine["_scalar_becomes_block"]
