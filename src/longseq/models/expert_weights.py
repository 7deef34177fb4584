"""Per-expert checkpoint tensors -> the stacked expert weights of models/sparse_moe.py.

Hub checkpoints (and transformers' save_pretrained, which converts back on save) store one matrix per expert:
Mixtral `model.layers.N.block_sparse_moe.experts.E.{w1,w3,w2}.weight` (gate, up, down) and its router as
`block_sparse_moe.gate.weight`; Qwen2/3-MoE `model.layers.N.mlp.experts.E.{gate,up,down}_proj.weight`. In memory
they are transformers' (>= 5) stacked `mlp.experts.gate_up_proj` (E, 2I, d), gate rows first, and
`mlp.experts.down_proj` (E, d, I) (its conversion_mapping.py). A stacked checkpoint loads by name as it is.
"""

from __future__ import annotations

import re

_EXPERT = re.compile(r"model\.layers\.(\d+)\.(?:mlp|block_sparse_moe)\.experts\.(\d+)\.(\w+)\.weight")
_MIXTRAL_ROUTER = re.compile(r"model\.layers\.(\d+)\.block_sparse_moe\.gate\.weight")
_PART = {"w1": "gate", "gate_proj": "gate", "w3": "up", "up_proj": "up", "w2": "down", "down_proj": "down"}


def expert_slot(name: str, intermediate_size: int) -> tuple[str, tuple] | None:
    """Where a checkpoint tensor named `name` goes: (stacked parameter name, index into it), or None when it is
    not a per-expert tensor. `intermediate_size`: each expert's width I."""
    if m := _MIXTRAL_ROUTER.fullmatch(name):
        return f"model.layers.{m.group(1)}.mlp.gate.weight", ()
    m = _EXPERT.fullmatch(name)
    if m is None or m.group(3) not in _PART:
        return None
    prefix, expert, part = f"model.layers.{m.group(1)}.mlp.experts", int(m.group(2)), _PART[m.group(3)]
    if part == "down":
        return f"{prefix}.down_proj", (expert,)
    rows = slice(0, intermediate_size) if part == "gate" else slice(intermediate_size, 2 * intermediate_size)
    return f"{prefix}.gate_up_proj", (expert, rows)
