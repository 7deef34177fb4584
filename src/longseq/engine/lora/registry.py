"""The adapters an engine serves, by name: registered from PEFT folders (or weights already read), looked up by the
requests that name them, removed while requests may still run on them."""

from __future__ import annotations

from pathlib import Path

from longseq.engine.lora.adapter import AdapterWeights, LoRAError, UnknownLoRAError, read_peft_adapter
from longseq.engine.lora.pool import LoRAAdapter, LoRAPool

MAX_NAME_CHARS = 256


class LoRARegistry:
    def __init__(self, pool: LoRAPool):
        self.pool = pool
        self.adapters: dict[str, LoRAAdapter] = {}

    def prepare(self, name: str, source: str | Path | AdapterWeights) -> LoRAAdapter:
        """Read (a folder) and pack an adapter without registering it: the slow part, safe on any thread."""
        self._check_name(name)
        weights = source if isinstance(source, AdapterWeights) else read_peft_adapter(source)
        return self.pool.pack(name, weights)

    def add(self, adapter: LoRAAdapter) -> None:
        self._check_name(adapter.name)  # again: another load of the name may have come first
        self.adapters[adapter.name] = adapter

    def remove(self, name: str) -> LoRAAdapter:
        """Unregister: new requests cannot name it; those running on it finish with it."""
        adapter = self.get(name)
        del self.adapters[name]
        self.pool.remove(adapter)
        return adapter

    def get(self, name: str) -> LoRAAdapter:
        adapter = self.adapters.get(name)
        if adapter is None:
            raise UnknownLoRAError(name)
        return adapter

    def _check_name(self, name: str) -> None:
        if not isinstance(name, str) or not name.strip() or len(name) > MAX_NAME_CHARS:
            raise LoRAError(f"an adapter name must be a non-empty string of at most {MAX_NAME_CHARS} characters, "
                            f"got {str(name)[:60]!r}")
        if name in self.adapters:
            raise LoRAError(f"the LoRA adapter '{name}' has already been loaded")
