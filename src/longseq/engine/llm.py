"""The offline API: `LLM(model).generate(prompts, SamplingParams(...))`, batched by the engine."""

from __future__ import annotations

from pathlib import Path

from longseq.config import EngineConfig
from longseq.engine.llm_engine import LLMEngine
from longseq.engine.outputs import RequestOutput
from longseq.generation.generate import render_prompt
from longseq.generation.sampling import SamplingParams


class LLM:
    def __init__(self, model: str | Path | None = None, *, dtype: str = "auto", device: str = "auto",
                 **engine_options):
        """`model`: HF directory, .gguf or None for the built-in model; `engine_options`: EngineConfig fields."""
        from longseq.models.loader import load

        cfg = EngineConfig(**engine_options)
        if cfg.tensor_parallel > 1:  # this process becomes rank 0 and starts the others (call close() at the end)
            from longseq.engine.tp_engine import start_engine

            self.engine = start_engine(model, dtype, device, cfg)
        else:
            lm = load(model, dtype=dtype, device=device, quantization=cfg.quantization,
                      group_size=cfg.quant_group_size)
            self.engine = LLMEngine(lm, cfg)
        self.tokenizer = self.engine.tokenizer

    def close(self) -> None:
        self.engine.close()

    def generate(self, prompts: str | list[str] | list[list[int]],
                 params: SamplingParams | list[SamplingParams] | None = None) -> list[RequestOutput]:
        """Plain completion of each prompt (text or token ids), all in flight together; results in input order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        ids = [p if isinstance(p, list) else list(self.tokenizer(p)["input_ids"]) for p in prompts]
        return self._run(ids, params)

    def chat(self, conversations: list[dict] | list[list[dict]],
             params: SamplingParams | list[SamplingParams] | None = None) -> list[RequestOutput]:
        """Each conversation through the model's chat template."""
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]
        return self._run([render_prompt(self.tokenizer, c, chat=True) for c in conversations], params)

    def _run(self, prompt_ids: list[list[int]], params) -> list[RequestOutput]:
        params = params or SamplingParams()
        per_request = params if isinstance(params, list) else [params] * len(prompt_ids)
        order = [self.engine.add_request(p, sp) for p, sp in zip(prompt_ids, per_request, strict=True)]
        done: dict[str, RequestOutput] = {}
        while self.engine.has_unfinished():
            for out in self.engine.step():
                if out.finished:
                    done[out.request_id] = out
        failed = next((done[r] for r in order if done[r].error is not None), None)
        if failed is not None:  # the others did finish (engine/isolation.py), but a list with a hole would mislead
            raise failed.error
        return [done[r] for r in order]
