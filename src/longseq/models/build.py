"""Turn a stream of (HF name, tensor) into a ready model without ever holding a second copy of it."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from longseq.config import ModelConfig
from longseq.errors import LongseqError
from longseq.models.expert_weights import expert_slot
from longseq.models.llama import CausalLM

# Older HF checkpoints store the RoPE table; we compute it.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def build_from_tensors(
    cfg: ModelConfig,
    tensors: Iterable[tuple[str, torch.Tensor]],
    dtype: torch.dtype,
    device: torch.device,
    source: str,
    freq_factors: torch.Tensor | None = None,
    quant=None,
) -> CausalLM:
    """`quant`: a models.quant.QuantLoader that takes the tensors of the linears it quantizes and swaps those layers
    in at the end (None: every weight as it is, in `dtype`)."""
    with torch.device("meta"):
        model = CausalLM(cfg)
    expected = dict(model.state_dict())
    state: dict[str, torch.Tensor] = {}
    stacked: dict[str, int] = {}  # a stacked expert weight -> elements written into it so far
    for name, tensor in tensors:
        if name.endswith(_IGNORED_SUFFIXES) or (quant is not None and quant.claim(name, tensor)):
            continue
        if name not in expected and (slot := expert_slot(name, cfg.moe_intermediate_size)) and slot[0] in expected:
            target, index = slot  # one expert's matrix of a stacked weight: written in place, never held twice
            if target not in state:
                state[target] = torch.empty(expected[target].shape, dtype=dtype, device=device)
            part = state[target][index]
            if tuple(tensor.shape) != tuple(part.shape):
                raise LongseqError(f"{source}: weight {name} has shape {tuple(tensor.shape)}, config expects "
                                   f"{tuple(part.shape)}")
            part.copy_(tensor)
            stacked[target] = stacked.get(target, 0) + tensor.numel()
            continue
        if name not in expected:
            if name == "lm_head.weight" and cfg.tie_word_embeddings:
                continue  # some tied checkpoints store the head too
            raise LongseqError(f"{source}: unexpected weight {name!r}; is this a {cfg.arch} model?")
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise LongseqError(
                f"{source}: weight {name} has shape {tuple(tensor.shape)}, config expects "
                f"{tuple(expected[name].shape)}"
            )
        state[name] = tensor.to(device=device, dtype=dtype)  # per tensor: peak = model + one tensor
    if cfg.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    if quant is not None:
        expected = {n: t for n, t in expected.items() if not quant.covers(n)}
    missing = [n for n in expected if n not in state or stacked.get(n, state[n].numel()) < state[n].numel()]
    if missing:
        raise LongseqError(f"{source}: {len(missing)} weight(s) missing, e.g. {missing[0]!r}")
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    if quant is not None:
        quant.install(model)
    model.rotary.freq_factors = freq_factors
    model.rotary.reset(device)
    return model.eval()
