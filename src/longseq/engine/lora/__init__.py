"""Multi-LoRA serving: PEFT adapters read and checked (adapter.py), a GPU pool of adapter slots with LRU eviction to
host memory (pool.py), and the registry of adapters by name (registry.py). The batched LoRA maths that each step
runs is models/lora_batched.py (Triton kernels in models/kernels/lora.py)."""

from longseq.engine.lora.adapter import AdapterWeights, LoRAError, UnknownLoRAError, read_peft_adapter
from longseq.engine.lora.pool import LoRAAdapter, LoRAPool
from longseq.engine.lora.registry import LoRARegistry

__all__ = ["AdapterWeights", "LoRAAdapter", "LoRAError", "LoRAPool", "LoRARegistry", "UnknownLoRAError",
           "read_peft_adapter"]
