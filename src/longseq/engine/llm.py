"""The offline API: `LLM(model).generate(prompts, SamplingParams(...))`, batched by the engine."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

from longseq.config import EngineConfig, ModelOverrides
from longseq.config.engine import check_served_overrides
from longseq.engine.llm_engine import LLMEngine
from longseq.engine.outputs import RequestOutput
from longseq.errors import LongseqError
from longseq.generation.generate import render_prompt
from longseq.generation.sampling import SamplingParams

if TYPE_CHECKING:
    from longseq.models.loader import LoadedModel


class LLM:
    def __init__(self, model: str | Path | LoadedModel | None = None, *, dtype: str = "auto", device: str = "auto",
                 loras: dict[str, str | Path] | None = None, **options):
        """`model`: HF directory, .gguf, None for the built-in model, or a model already loaded (models/loader.py:
        served as it is, `quantization` applied to what it holds in 16 bits); `loras`: LoRA adapters to serve beside
        it, name -> PEFT folder (more with `add_lora`; implies enable_lora); `options`: EngineConfig fields, and
        ModelOverrides fields applied to the model before it is served (attention="memory", window=4096, ...: a
        model already loaded is changed in place)."""
        from longseq.models.loader import LoadedModel, load

        overrides, engine_options = split_options(options)
        if loras:
            engine_options.setdefault("enable_lora", True)
        cfg = EngineConfig(**engine_options)
        if overrides is not None and cfg.tensor_parallel > 1:
            raise LongseqError(f"{', '.join(sorted(set(options) - set(engine_options)))}: model overrides are "
                               "applied on one GPU; drop tensor_parallel")
        if isinstance(model, LoadedModel):
            if cfg.tensor_parallel > 1:
                raise LongseqError("a model already loaded is served on one GPU; give its path for tensor_parallel")
            self.engine = LLMEngine(with_overrides(model, overrides), cfg)
        elif cfg.tensor_parallel > 1:  # this process becomes rank 0 and starts the others (call close() at the end)
            from longseq.engine.tp_engine import start_engine

            self.engine = start_engine(model, dtype, device, cfg)
        else:
            lm = load(model, dtype=dtype, device=device, quantization=cfg.quantization,
                      group_size=cfg.quant_group_size)
            self.engine = LLMEngine(with_overrides(lm, overrides), cfg)
        self.tokenizer = self.engine.tokenizer
        for name, path in (loras or {}).items():
            self.add_lora(name, path)

    def add_lora(self, name: str, path: str | Path) -> None:
        """Register a PEFT LoRA adapter folder under `name`, for `generate(..., lora=name)`."""
        self.engine.add_lora(name, path)

    def remove_lora(self, name: str) -> None:
        self.engine.remove_lora(name)

    def close(self) -> None:
        self.engine.close()

    def generate(self, prompts: str | list[str] | list[list[int]],
                 params: SamplingParams | list[SamplingParams] | None = None,
                 lora: str | list[str | None] | None = None) -> list[RequestOutput]:
        """Plain completion of each prompt (text or token ids), all in flight together; results in input order.
        `lora`: the adapter (a name given to `add_lora`) of every prompt, or one per prompt; None: the base model."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        ids = [p if isinstance(p, list) else list(self.tokenizer(p)["input_ids"]) for p in prompts]
        return self._run(ids, params, lora)

    def chat(self, conversations: list[dict] | list[list[dict]],
             params: SamplingParams | list[SamplingParams] | None = None,
             lora: str | list[str | None] | None = None) -> list[RequestOutput]:
        """Each conversation through the model's chat template."""
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]
        return self._run([render_prompt(self.tokenizer, c, chat=True) for c in conversations], params, lora)

    def _run(self, prompt_ids: list[list[int]], params, lora=None) -> list[RequestOutput]:
        params = params or SamplingParams()
        per_request = params if isinstance(params, list) else [params] * len(prompt_ids)
        loras = lora if isinstance(lora, list) else [lora] * len(prompt_ids)
        for name in set(loras) - {None}:  # every name before any request is queued
            self.engine.lora(name)
        order = [self.engine.add_request(p, sp, lora=name)
                 for p, sp, name in zip(prompt_ids, per_request, loras, strict=True)]
        done: dict[str, RequestOutput] = {}
        while self.engine.has_unfinished():
            for out in self.engine.step():
                if out.finished:
                    done[out.request_id] = out
        failed = next((done[r] for r in order if done[r].error is not None), None)
        if failed is not None:  # the others did finish (engine/isolation.py), but a list with a hole would mislead
            raise failed.error
        return [done[r] for r in order]


def split_options(options: dict) -> tuple[ModelOverrides | None, dict]:
    """LLM's keyword options as ModelOverrides (None where none is given) and the EngineConfig fields left."""
    names = {f.name for f in dataclasses.fields(ModelOverrides)}
    model = {k: v for k, v in options.items() if k in names}
    return (ModelOverrides(**model) if model else None), {k: v for k, v in options.items() if k not in names}


def with_overrides(lm: LoadedModel, overrides: ModelOverrides | None) -> LoadedModel:
    """lm with `overrides` applied to its model (in place); those the engine would not use are refused."""
    if overrides is None:
        return lm
    from longseq.models.overrides import apply_overrides

    check_served_overrides(overrides)
    apply_overrides(lm.model, overrides)
    return lm
