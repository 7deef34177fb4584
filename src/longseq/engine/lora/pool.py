"""The adapters' GPU memory: a fixed pool of `max_loras` slots, each holding one adapter's factors for every fused
projection of the model, padded to `max_lora_rank` (S-LoRA's unified memory, Sheng et al. 2023, without paging:
fixed-size slots). Every registered adapter is kept on the host, packed in the slot layout (page-locked on CUDA), so
loading one into a slot is one copy; more adapters than slots can be registered, and a slot whose adapter no running
request uses is evicted least recently used first.

A running request pins its adapter's slot (the scheduler acquires it at admission and releases it when the request
finishes or is preempted). On CUDA, loads run on a side stream, so they overlap the step in flight: a load waits
only for the last step that read the slot it overwrites, and the next step waits for the loads issued before it.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from dataclasses import dataclass

import torch

from longseq.engine.lora.adapter import AdapterWeights, LoRAError
from longseq.errors import LongseqError
from longseq.models.llama import CausalLM
from longseq.models.lora_batched import BatchedLoRA, LoRABatch, LoRAState
from longseq.models.sparse_moe import SparseMoeBlock

_uids = itertools.count(1)


@dataclass(frozen=True)
class Projection:
    """One fused projection of one layer (q/k/v, o, gate/up or down) and where its factors sit in a slot."""

    layer: int
    modules: tuple[str, ...]
    in_features: int
    sizes: tuple[int, ...]  # out features of each fused module
    a_offset: int  # a: (len(modules) * R, in_features) at this offset of the slot's flat storage
    b_offset: int  # b: (R, sum(sizes))

    def views(self, flat: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(a, b) inside `flat` (..., slot numel): one slot's, or the pool's over its leading slot dimension."""
        n_a, n_b = len(self.modules) * rank * self.in_features, rank * sum(self.sizes)
        a = flat[..., self.a_offset : self.a_offset + n_a].unflatten(-1, (len(self.modules) * rank, self.in_features))
        b = flat[..., self.b_offset : self.b_offset + n_b].unflatten(-1, (rank, sum(self.sizes)))
        return a, b


class LoRAAdapter:
    """A registered adapter: its factors packed in the pool's slot layout on the host."""

    def __init__(self, name: str, path: str, rank: int, targets: list[str], host: torch.Tensor):
        self.uid = next(_uids)
        self.name, self.path, self.rank, self.targets, self.host = name, path, rank, targets, host
        # The prefix-cache chain of its requests starts here: KV computed under one adapter is never another's.
        self.cache_salt = hash(("lora", self.uid))
        self.removed = False  # unregistered: its slot is freed once no request uses it


def projections(model: CausalLM, rank: int) -> list[tuple[Projection, object]]:
    """Every fused projection of the model with its FusedLinear, laid out one after another in a slot."""
    out, offset = [], 0
    for i, layer in enumerate(model.model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        groups = [(attn.qkv, attn, ("q_proj", "k_proj", "v_proj")), (attn.o, attn, ("o_proj",))]
        if not isinstance(mlp, SparseMoeBlock):  # experts take no adapter: an adapter of them is refused
            groups += [(mlp.gate_up, mlp, ("gate_proj", "up_proj")), (mlp.down, mlp, ("down_proj",))]
        for fused, parent, names in groups:
            if fused is None:
                raise LongseqError("LoRA serving adds the adapters to the fused projections, and this model's "
                                   f"layer {i} {'/'.join(names)} has none (--no-fuse-projections, or layers that "
                                   "are not plain linear layers)")
            in_features = getattr(parent, names[0]).in_features
            sizes = tuple(fused.sizes)
            p = Projection(i, names, in_features, sizes, offset, offset + len(names) * rank * in_features)
            offset = p.b_offset + rank * sum(sizes)
            out.append((p, fused))
    return out


class LoRAPool:
    def __init__(self, model: CausalLM, num_slots: int, max_rank: int):
        weight = model.lm_head.weight
        self.device, self.dtype = weight.device, weight.dtype
        self.num_slots, self.max_rank = num_slots, max_rank
        self.num_layers = model.config.num_layers
        found = projections(model, max_rank)
        self.projections = [p for p, _ in found]
        self.slot_numel = self.projections[-1].b_offset + max_rank * sum(self.projections[-1].sizes)
        self.storage = torch.zeros(num_slots, self.slot_numel, dtype=self.dtype, device=self.device)
        self.state = LoRAState()  # the step's LoRABatch, read by every projection's hook
        for p, fused in found:
            fused.lora = BatchedLoRA(*p.views(self.storage, max_rank), list(p.sizes), max_rank, self.state)
        self._where = {(p.layer, m): (p, j) for p in self.projections for j, m in enumerate(p.modules)}
        # Slots: the adapter in each, pins by running requests, resident unpinned ones (oldest use first), empty.
        self.adapter_of: list[LoRAAdapter | None] = [None] * num_slots
        self.slot_of: dict[int, int] = {}  # adapter uid -> slot
        self.pins = [0] * num_slots
        self.idle: OrderedDict[int, None] = OrderedDict()
        self.free = list(range(num_slots - 1, -1, -1))
        self.num_loads = self.num_evictions = 0
        cuda = self.device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(self.device) if cuda else None
        self._loaded: list[torch.cuda.Event] = []  # loads the next step waits for
        self._last_read: list[torch.cuda.Event | None] = [None] * num_slots  # the last step reading each slot

    @property
    def nbytes(self) -> int:
        return self.storage.numel() * self.storage.element_size()

    # ---- adapters -------------------------------------------------------------------------------------------

    def pack(self, name: str, weights: AdapterWeights) -> LoRAAdapter:
        """The adapter checked against this model and packed in the slot layout on the host (page-locked on CUDA,
        so that loads copy without staging). Touches no pool state: any thread may call it."""
        where, R = weights.path, self.max_rank
        if weights.rank > R:
            raise LoRAError(f"{where}: rank {weights.rank} is above this engine's max_lora_rank {R} (start it with "
                            f"--max-lora-rank {weights.rank} or more)")
        host = torch.zeros(self.slot_numel, dtype=self.dtype, pin_memory=self.device.type == "cuda")
        for (layer, module), (a, b, scale) in weights.modules.items():
            hit = self._where.get((layer, module))
            if hit is None:
                if layer >= self.num_layers:
                    raise LoRAError(f"{where}: adapts layer {layer}, and this model has {self.num_layers} layers: is "
                                    f"the adapter made for this base model{_base(weights)}?")
                raise LoRAError(f"{where}: adapts layers.{layer}.{module}, which this model's layer {layer} does not "
                                "have as a dense linear layer (mixture-of-experts layers take no adapter)")
            p, j = hit
            rank, out = a.shape[0], p.sizes[j]
            if a.shape[1] != p.in_features or b.shape[0] != out:
                raise LoRAError(f"{where}: layers.{layer}.{module} has lora_A {tuple(a.shape)} and lora_B "
                                f"{tuple(b.shape)}, and this model's {module} maps {p.in_features} to {out} features: "
                                f"is the adapter made for this base model{_base(weights)}?")
            if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
                raise LoRAError(f"{where}: layers.{layer}.{module} holds NaN or infinite values")
            pa, pb = p.views(host, R)
            start = sum(p.sizes[:j])
            pa[j * R : j * R + rank] = a.to(self.dtype)
            pb[:rank, start : start + out] = (b * scale).T.to(self.dtype)
        return LoRAAdapter(name, weights.path, weights.rank, weights.targets, host)

    def remove(self, adapter: LoRAAdapter) -> None:
        """Unregistered: its slot is freed now, or when the last request using it ends."""
        adapter.removed = True
        slot = self.slot_of.get(adapter.uid)
        if slot is not None and self.pins[slot] == 0:
            self.idle.pop(slot, None)
            self._vacate(slot)

    # ---- slots (the scheduler's) ------------------------------------------------------------------------------

    def can_acquire(self, adapter: LoRAAdapter) -> bool:
        return adapter.uid in self.slot_of or bool(self.free) or bool(self.idle)

    def acquire(self, adapter: LoRAAdapter) -> int | None:
        """A slot holding the adapter, pinned; loaded now (evicting the least recently used idle slot) if it is
        not resident. None where every slot is pinned."""
        slot = self.slot_of.get(adapter.uid)
        if slot is None:
            if self.free:
                slot = self.free.pop()
            elif self.idle:
                slot, _ = self.idle.popitem(last=False)
                del self.slot_of[self.adapter_of[slot].uid]
                self.num_evictions += 1
            else:
                return None
            self._load(slot, adapter)
            self.adapter_of[slot], self.slot_of[adapter.uid] = adapter, slot
        self.idle.pop(slot, None)
        self.pins[slot] += 1
        return slot

    def release(self, slot: int) -> None:
        self.pins[slot] -= 1
        assert self.pins[slot] >= 0
        if self.pins[slot] == 0:
            if self.adapter_of[slot].removed:
                self._vacate(slot)
            else:
                self.idle[slot] = None  # most recently used last

    def _vacate(self, slot: int) -> None:
        del self.slot_of[self.adapter_of[slot].uid]
        self.adapter_of[slot] = None
        self.free.append(slot)

    def _load(self, slot: int, adapter: LoRAAdapter) -> None:
        self.num_loads += 1
        if self.copy_stream is None:
            self.storage[slot].copy_(adapter.host)
            return
        with torch.cuda.stream(self.copy_stream):
            if self._last_read[slot] is not None:  # a step launched earlier may still read the old adapter
                self.copy_stream.wait_event(self._last_read[slot])
            self.storage[slot].copy_(adapter.host, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.copy_stream)
        self._loaded.append(done)

    # ---- steps (the runner's) ---------------------------------------------------------------------------------

    def begin_step(self) -> None:
        """Before a step is launched: it waits on the device for the loads issued since the last one."""
        stream = torch.cuda.current_stream(self.device) if self._loaded else None
        for done in self._loaded:
            stream.wait_event(done)
        self._loaded.clear()

    def use(self, seq_slots: list[int] | None, query_lens: list[int]) -> None:
        """An eager step's hooks: each token takes its sequence's slot (-1: the base); None: no adapter at all."""
        if seq_slots is None:
            self.state.batch = None
            return
        tokens = torch.tensor(seq_slots).repeat_interleave(torch.tensor(query_lens))
        if self.device.type == "cuda":
            tokens = tokens.pin_memory()
        self.state.batch = LoRABatch.build(tokens.to(self.device, non_blocking=True), self.num_slots)

    def end_step(self, seq_slots: list[int] | None) -> None:
        """After a step is launched: the hooks go quiet (any other forward of the model is the base's) and the slots
        it read remember the step, for loads that would overwrite them."""
        self.state.batch = None
        if seq_slots is None or self.copy_stream is None:
            return
        read = torch.cuda.Event()
        read.record(torch.cuda.current_stream(self.device))
        for slot in set(seq_slots):
            if slot >= 0:
                self._last_read[slot] = read


def _base(weights: AdapterWeights) -> str:
    return f" ({weights.base_model})" if weights.base_model else ""
