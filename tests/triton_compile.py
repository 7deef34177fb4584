"""Compile the Triton kernels that longseq's wrappers launch, for an H100/H200 (sm_90), on a machine without a GPU.

CI runs the kernels under Triton's interpreter (tests/conftest.py), which never type-checks them: a kernel that
Triton's compiler refuses passes there and fails on the first GPU. Triton's frontend (Python AST -> TTIR) needs no
GPU, and neither do the CUDA backend's stages down to a cubin (LLVM and the ptxas that ships with Triton). This
script runs the wrappers (tests/triton_launches.py) with every launch recorded instead of run, builds each launch's
signature as Triton's launcher would on the device (its own binder, for the CUDA backend), and compiles it.

Run as a script by tests/test_triton_compile.py, in a process without TRITON_INTERPRET (so that `triton.jit` gives
real JITFunctions); it prints one JSON line per distinct launch: {"kernel", "variant", "through", "error"} (error:
null when it compiled). `python tests/triton_compile.py FILE`: also the launches of FILE's `launch()` (the checker's
own test); `--all-to-cubin`: every launch down to a cubin, not only each kernel's first (minutes, not seconds).
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import json
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

assert os.environ.get("TRITON_INTERPRET", "0") == "0", "the interpreter's triton.jit gives no JITFunctions"

import triton._C.libtriton as libtriton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.compiler.compiler import make_backend  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)  # H100 / H200
# Launch options, not kernel arguments: what a variant's name shows of them.
OPTION_NAMES = ("num_warps", "num_stages")


@dataclass
class Launch:
    """One recorded `kernel[grid](*args, **kwargs)`."""

    fn: JITFunction
    args: tuple
    kwargs: dict
    bound: dict = field(default_factory=dict)  # name -> value, Triton's binding (filled by `specialize`)


@contextlib.contextmanager
def recording() -> Iterator[list[Launch]]:
    """Within: every JITFunction launch is appended to the yielded list instead of running; an autotuned kernel's
    launch is recorded once per config of its list (any of them may win the tuning on the device)."""
    launches: list[Launch] = []

    def run(self, *args, grid, warmup, **kwargs):
        launches.append(Launch(self, args, kwargs))

    def tuned(self, *args, grid, warmup, **kwargs):
        for config in self.configs:
            self.fn.run(*args, grid=grid, warmup=warmup, **kwargs, **config.all_kwargs())

    saved = JITFunction.run, Autotuner.run
    JITFunction.run, Autotuner.run = run, tuned
    try:
        yield launches
    finally:
        JITFunction.run, Autotuner.run = saved


def specialize(launch: Launch, backend) -> tuple[dict, dict, dict, dict]:
    """(signature, constexprs, attrs, options) as JITFunction.run builds them on the device: Triton's own binder
    decides each argument's type (a tensor's dtype, an int's i32 / i64 or constexpr 1) and alignment."""
    fn = launch.fn
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, spec, options = binder(*launch.args, **launch.kwargs)
    launch.bound = bound
    values = list(bound.values())
    signature = {name: s[0] for name, s in zip(fn.arg_names, spec, strict=True)}
    constexprs = {(i,): values[i] for i, s in enumerate(spec) if s[0] == "constexpr"}
    attrs = {(i,): backend.parse_attr(s[1]) for i, s in enumerate(spec) if isinstance(s[1], str)}
    return signature, constexprs, attrs, options


STAGES = ("ttir", "ttgir", "llir", "ptx", "cubin")  # the CUDA backend's, after the frontend


def compile_launch(launch: Launch, specialized: tuple[dict, dict, dict, dict], backend, through: str) -> str | None:
    """Compile one launch (`specialize`'s answer for it) for TARGET: Triton's frontend, then the backend's stages
    up to `through` ("ttir": the TTIR passes, inlining, canonicalisation and the verifier, a fraction of the
    frontend's time; "cubin": down to ptxas, tens of times as long). None, or Triton's message."""
    signature, constexprs, attrs, kw = specialized
    try:
        options = backend.parse_options(kw)
        src = ASTSource(launch.fn, signature, constexprs, attrs)
        ctx = libtriton.ir.context()
        libtriton.ir.load_dialects(ctx)
        backend.load_dialects(ctx)
        args = (options, backend.get_codegen_implementation(options), backend.get_module_map(), ctx)
        # older Tritons (the GPU machine may have one) take no target
        module = src.make_ir(*((TARGET, *args) if "target" in inspect.signature(src.make_ir).parameters else args))
        stages, metadata = {}, {}
        backend.add_stages(stages, options, src.language)
        for stage in STAGES[: STAGES.index(through) + 1]:
            module = stages[stage](module, metadata)
    except Exception as e:  # any refusal is the finding
        return _message(e)
    return None


def _message(e: Exception) -> str:
    """Triton's error in one line: a CompilationError's `at LINE:COL:` and its last line (the source excerpt
    between them dropped)."""
    lines = [line for line in str(e).strip().splitlines() if line.strip()]
    if not lines:
        return type(e).__name__
    return f"{type(e).__name__}: {lines[0]} {lines[-1]}" if len(lines) > 1 else f"{type(e).__name__}: {lines[0]}"


def variant(launch: Launch, signature: dict) -> str:
    """The launch's argument types (as Triton specialised them), constexprs and options in one line, e.g.
    `X:*bf16 N:i32 stride:constexpr=1 BLOCK:constexpr=1024 num_warps=4`."""
    parts = [f"{name}:{ty}" + (f"={launch.bound[name]!r}" if ty == "constexpr" else "")
             for name, ty in signature.items()]
    return " ".join(parts + [f"{k}={launch.kwargs[k]}" for k in OPTION_NAMES if k in launch.kwargs])


def kernel_name(fn: JITFunction) -> str:
    return f"{fn.fn.__module__}.{fn.fn.__qualname__}"


def check(scenarios: Callable[[], None], all_to_cubin: bool = False) -> Iterator[dict]:
    """Run `scenarios` recording its launches, then compile each distinct one: a dict per launch. Each kernel's
    first launch goes through every stage down to a cubin (what its other launches share with it: the backend's
    lowering of its code), the others through TTIR; `all_to_cubin`: every launch down to a cubin."""
    with recording() as launches:
        scenarios()
    backend = make_backend(TARGET)
    seen, kernels = set(), set()
    for launch in launches:
        name = kernel_name(launch.fn)
        try:
            specialized = specialize(launch, backend)
        except Exception as e:  # arguments Triton's launcher would refuse
            yield {"kernel": name, "variant": repr(launch.kwargs), "error": _message(e)}
            continue
        key = (name, repr(specialized))
        if key not in seen:
            seen.add(key)
            through = "cubin" if all_to_cubin or name not in kernels else "ttir"
            kernels.add(name)
            error = compile_launch(launch, specialized, backend, through)
            yield {"kernel": name, "variant": variant(launch, specialized[0]), "through": through, "error": error}


def _load(path: str):
    spec = importlib.util.spec_from_file_location("extra_launches", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv: list[str]) -> None:
    import triton_launches

    all_to_cubin = "--all-to-cubin" in argv
    runs = [triton_launches.launch_all] + [_load(path).launch for path in argv if path != "--all-to-cubin"]
    for run in runs:
        for result in check(run, all_to_cubin):
            print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
