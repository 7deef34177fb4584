"""The memory techniques `longseq train --plan auto` picks, and `longseq plan train` shows: the fastest candidate
whose predicted peak fits the memory there is.

The candidates, fastest first: no recompute; keep_attention (recompute all but attention) with as many of the last
layers plain (recomputing only the SwiGLU product) as fit, all of them first; selective; keep_attention, untiled
then with tiled norms and MLPs; full with as many of the last layers under keep_attention as fit (tiled: a layer
that keeps its attention costs its q, k, v and output, and saves attention's quadratic forward, the most time per
byte at long sequences); full with plain layers, full, untiled then tiled; layer inputs offloaded to pinned host
memory (keeping on the GPU as many of the last layers' inputs as fit).

What the user fixed is kept as given: a forced `--recompute P` recomputes P on every layer (no plain or
keep_attention layers unless `--plain-layers` / `--attention-layers` ask for them); `--tile-tokens`,
`--offload-keep`, `--plain-layers` and `--attention-layers` likewise.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from longseq.config.policy import DEFAULT_TILE_TOKENS, PLAIN_LAYER_POLICIES
from longseq.plan.memory import ALLOCATOR_SLACK, CUDA_CONTEXT_GIB, train_memory
from longseq.plan.models import ModelSpec
from longseq.plan.setup import TrainSetup

GIB = 2**30
MARGIN = 0.95  # of the budget: room for the planner's error on measured runs


@dataclass(frozen=True)
class Fixed:
    """What the user set; None: the planner chooses (as `longseq train`'s flags: tile 0 is off)."""

    recompute: str = "auto"
    tile_tokens: int | None = None
    offload_keep: int | None = None
    plain_layers: int | None = None
    attention_layers: int | None = None

    @property
    def auto(self) -> bool:
        return (self.recompute == "auto" or self.tile_tokens is None or self.offload_keep is None
                or self.plain_layers is None or self.attention_layers is None)


Candidate = tuple[str, int | None, int, int, int]  # recompute, tile, offload_keep, plain_layers, attention_layers


@dataclass(frozen=True)
class Choice:
    recompute: str
    tile: int | None  # tokens per RMSNorm / MLP tile; None: whole sequences
    offload_keep: int  # layers whose inputs stay on the GPU under "offloaded"
    plain_layers: int  # keep_attention / full: the last layers that recompute only the SwiGLU product
    attention_layers: int  # full: the layers below the plain ones that recompute as keep_attention
    device_bytes: float  # predicted peak on the device: allocated, allocator slack, CUDA context
    host_bytes: float  # pinned host memory for offloaded layer inputs
    fits: bool

    def flags(self, num_layers: int) -> str:
        """The `longseq train` flags that reproduce this choice without the planner."""
        out = [f"--recompute {self.recompute}", f"--tile-tokens {self.tile or 0}"]
        if self.recompute in PLAIN_LAYER_POLICIES:
            out.append(f"--plain-layers {self.plain_layers}")
        if self.recompute == "full":
            out.append(f"--attention-layers {self.attention_layers}")
        if self.recompute == "offloaded":
            out.append(f"--offload-keep {min(self.offload_keep, num_layers)}")
        return " ".join(out)


def candidates(fixed: Fixed, num_layers: int, offload: bool) -> list[Candidate]:
    """(recompute, tile, offload_keep, plain_layers, attention_layers) to try, fastest first, restricted by what
    the user fixed. offload: host offload is a candidate (a single-process GPU run)."""
    tile_on = fixed.tile_tokens if fixed.tile_tokens else DEFAULT_TILE_TOKENS

    def plain(policy: str, most: int) -> list[Candidate]:  # each plain layer buys back one layer's recompute
        return [(policy, None, 0, n, 0) for n in range(most, 0, -1)]

    # full's last layers under keep_attention, each one buying back its attention's forward
    kept: list[Candidate] = [("full", tile_on, 0, 0, n) for n in range(num_layers - 1, 0, -1)]
    out: list[Candidate] = [("none", None, 0, 0, 0), *plain("keep_attention", num_layers),
                            ("selective", None, 0, 0, 0), ("keep_attention", None, 0, 0, 0),
                            ("keep_attention", tile_on, 0, 0, 0), *kept, *plain("full", num_layers - 1),
                            ("full", None, 0, 0, 0), ("full", tile_on, 0, 0, 0)]
    if offload:
        out += [("offloaded", tile_on, keep, 0, 0) for keep in range(num_layers - 1, -1, -1)]
    if fixed.recompute != "auto":  # the policy on every layer: plain / keep_attention layers only where asked for
        out = ([c for c in out if c[0] == fixed.recompute and c[3] == c[4] == 0]
               or [(fixed.recompute, tile_on, 0, 0, 0)])
    if fixed.tile_tokens is not None:
        out = [(r, fixed.tile_tokens or None, k, n, a) for r, _, k, n, a in out]
    if fixed.offload_keep is not None:
        out = [(r, t, fixed.offload_keep, n, a) for r, t, _, n, a in out]
    if fixed.plain_layers is not None:  # plain layers asked for: no keep_attention layers beside them
        out = [(r, t, k, min(fixed.plain_layers, num_layers) if r in PLAIN_LAYER_POLICIES else 0,
                0 if fixed.plain_layers else a) for r, t, k, _, a in out]
    if fixed.attention_layers is not None:
        out = [(r, t, k, n, min(fixed.attention_layers, num_layers - n) if r == "full" else 0)
               for r, t, k, n, _ in out]
    return list(dict.fromkeys(out))


def predict(spec: ModelSpec, setup: TrainSetup) -> tuple[float, float]:
    """(peak device bytes without the model's load peak, pinned host bytes)."""
    mem = train_memory(spec, setup)
    return mem.allocated * (1 + ALLOCATOR_SLACK) + CUDA_CONTEXT_GIB * GIB, mem.activation.host


def with_candidate(setup: TrainSetup, candidate: Candidate) -> TrainSetup:
    recompute, tile, keep, plain, kept = candidate
    return replace(setup, recompute=recompute, mlp_tile=tile, offload_keep=keep, plain_layers=plain,
                   attention_layers=kept)


def choose(spec: ModelSpec, base: TrainSetup, fixed: Fixed, budget_bytes: float | None,
           host_budget_bytes: float | None = None, offload: bool = True) -> Choice:
    """The fastest candidate predicted to fit `budget_bytes` (None: anything fits, so the fastest) and the host
    budget; the most frugal one (fits False) when none does."""
    best = None
    for cand in candidates(fixed, spec.config.num_layers, offload):
        device, host = predict(spec, with_candidate(base, cand))
        fits = ((budget_bytes is None or device <= budget_bytes * MARGIN)
                and (host_budget_bytes is None or host <= host_budget_bytes * MARGIN))
        choice = Choice(*cand, device, host, fits)
        if fits:
            return choice
        if best is None or device < best.device_bytes:
            best = choice
    return best
