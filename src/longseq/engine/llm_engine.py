"""The engine: requests in, one scheduler step at a time, RequestOutput snapshots out."""

from __future__ import annotations

import random
import time
import uuid
from pathlib import Path
from typing import Any

from longseq.config import EngineConfig
from longseq.config.engine import check_served_attention
from longseq.engine.block_manager import BlockManager
from longseq.engine.inflight import InflightStep, RowLogprobs
from longseq.engine.isolation import Isolation
from longseq.engine.lora import AdapterWeights, LoRAAdapter, LoRARegistry, UnknownLoRAError
from longseq.engine.model_runner import ModelRunner
from longseq.engine.outputs import RequestOutput, TokenLogprob
from longseq.engine.requests import RequestLimits
from longseq.engine.sampler import Sampler
from longseq.engine.scheduler import Scheduler
from longseq.engine.sequence import Sequence, Status
from longseq.errors import LongseqError
from longseq.generation.sampling import SamplingParams


class LLMEngine:
    def __init__(self, lm: Any, cfg: EngineConfig | None = None, runner: ModelRunner | None = None):
        """`lm` is a LoadedModel (model + tokenizer); `runner` a ModelRunner subclass (tensor parallel)."""
        self.lm, self.cfg = lm, cfg or EngineConfig()
        check_served_attention(self.cfg, lm.config)
        attn = lm.config.attention
        self.tokenizer = lm.tokenizer
        self.runner = runner or ModelRunner(lm.model, self.cfg)
        # Memory attention: prompt chunks and prefix-cache hits end on whole query blocks where they can, so that
        # a prompt is cut into query blocks as `generate` cuts it, however it is scheduled (paged_memory_plan.py).
        align = attn.block_size if attn.variant == "memory" else 1
        self.blocks = BlockManager(self.runner.num_blocks, self.cfg.kv_block_size, self.cfg.enable_prefix_caching,
                                   prefix_align=align // self.cfg.kv_block_size or 1)
        self.limits = RequestLimits(self.runner.max_model_len, lm.config.vocab_size, self.cfg.kv_block_size,
                                    self.blocks.num_blocks)
        self.scheduler = Scheduler(self.blocks, self.cfg.max_num_seqs, self.cfg.max_num_batched_tokens,
                                   self.runner.lora, chunk_align=align)
        # LoRA serving: the adapters by name, over the runner's pool of GPU slots (None: adapters are off)
        self.loras = LoRARegistry(self.runner.lora) if self.runner.lora is not None else None
        self.sampler = Sampler(lm.config.vocab_size, self.runner.device)
        self.seeds = random.Random()  # the sampling seed of each request that brings none
        self.seqs: dict[str, Sequence] = {}
        self.eos_token_ids = set(lm.eos_token_ids)
        self.inflight: InflightStep | None = None  # launched ahead of its predecessor's tokens (async scheduling)
        self.num_steps_ahead = 0  # steps launched that way
        self.isolation = Isolation(self)  # finds the request that makes a step raise (engine/isolation.py)

    # ---- requests ---------------------------------------------------------------------------------------

    @property
    def max_model_len(self) -> int:
        return self.limits.max_model_len

    def add_request(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None,
                    max_output_tokens: int | None = None, lora: str | None = None) -> str:
        """Queue a request; returns its id. `max_output_tokens`: what `limits.check` returned for it, where the
        caller has checked it already (the server); otherwise it is checked here. `lora`: the name of a registered
        adapter to run it with (None: the base model); an unknown name raises UnknownLoRAError."""
        adapter = self.lora(lora) if lora is not None else None
        if max_output_tokens is None:
            max_output_tokens = self.limits.check(prompt_ids, params.max_new_tokens)
        self.limits.check_sampling(params)
        request_id = request_id or uuid.uuid4().hex
        if request_id in self.seqs:
            raise LongseqError(f"request id {request_id!r} is already in use")
        seq = Sequence(request_id, prompt_ids, params, self.tokenizer, max_output_tokens,
                       seed=self.seeds.getrandbits(64), lora=adapter)
        self.seqs[request_id] = seq
        if self.isolation.active:
            self.isolation.hold(seq)
        else:
            self.scheduler.add(seq)
        return request_id

    # ---- LoRA adapters ----------------------------------------------------------------------------------

    def add_lora(self, name: str, source: str | Path | AdapterWeights | LoRAAdapter) -> LoRAAdapter:
        """Register an adapter (a PEFT folder, weights already read, or what `prepare_lora` made) under `name`;
        LoRAError where it cannot be served. Its requests may then name it; it is loaded into a GPU slot when one
        of them is scheduled."""
        adapter = source if isinstance(source, LoRAAdapter) else self.prepare_lora(name, source)
        self._registry().add(adapter)
        return adapter

    def prepare_lora(self, name: str, source: str | Path | AdapterWeights) -> LoRAAdapter:
        """An adapter read, checked against this model and packed for the pool, not registered yet: the slow part
        of add_lora, which touches no engine state (the server runs it off the engine thread)."""
        return self._registry().prepare(name, source)

    def remove_lora(self, name: str) -> None:
        """Unregister an adapter: new requests cannot name it, those running on it finish with it."""
        self._registry().remove(name)

    def lora(self, name: str) -> LoRAAdapter:
        """The registered adapter of that name (UnknownLoRAError if none)."""
        if self.loras is None:
            raise UnknownLoRAError(name)
        return self.loras.get(name)

    def _registry(self) -> LoRARegistry:
        if self.loras is None:
            raise LongseqError("LoRA adapters are off in this engine: start it with enable_lora (longseq serve "
                               "--enable-lora, or --lora NAME=PATH)")
        return self.loras

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request now and free its KV blocks."""
        seq = self.seqs.pop(request_id, None)
        if seq is None:
            return None
        self._retire(seq, "abort")
        self._drop_stale_inflight()
        return self._output(seq, "")

    def close(self) -> None:
        """Release what the runner holds beyond this process (tensor-parallel workers)."""
        close = getattr(self.runner, "close", None)
        if close is not None:
            close()

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or self.isolation.active

    def stats(self) -> dict[str, Any]:
        return {
            "num_waiting": len(self.scheduler.waiting) + self.isolation.num_held,
            "num_running": len(self.scheduler.running),
            "kv_cache_usage": self.blocks.usage, "num_preempted": self.scheduler.num_preempted,
        }

    # ---- the step ---------------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """One step's outputs. With async scheduling the next decode step is queued on the device before this
        step's tokens are read, so the host's work below overlaps the GPU's. A step that raises fails only the
        request that caused it, once found (engine/isolation.py): its output carries the error."""
        self.isolation.advance()
        try:
            return self._step()
        except Exception as e:
            return self.isolation.failed(e)

    def _step(self) -> list[RequestOutput]:
        launched, self.inflight = self.inflight, None
        if launched is None:
            scheduled = self.scheduler.schedule()
            if not scheduled:
                return []
            launched = self._launch(scheduled)
        if self.cfg.async_scheduling and not self.isolation.active:
            self.inflight = self._launch_ahead(launched)
        return self._finish(launched)

    def _launch(self, scheduled: list[tuple[Sequence, int]], ids=None) -> InflightStep:
        logits, to_sample = self.runner.run(scheduled, ids)
        for seq, n in scheduled:
            seq.num_computed_tokens += n
        return InflightStep(scheduled, to_sample, self.sampler(logits, to_sample) if to_sample else None)

    def _launch_ahead(self, prev: InflightStep) -> InflightStep | None:
        """The decode step the scheduler will issue after `prev`, launched now from prev's tokens on the device;
        None where the scheduler cannot tell that step yet, or the runner needs the tokens on the host."""
        if not self.runner.takes_device_ids:
            return None
        ahead = self.scheduler.schedule_ahead(prev.scheduled, prev.to_sample)
        if ahead is None:
            return None
        scheduled, rows = ahead
        ids = prev.tokens if len(rows) == len(prev.to_sample) else prev.tokens[rows]
        self.num_steps_ahead += 1
        return self._launch(scheduled, ids)

    def _finish(self, launched: InflightStep) -> list[RequestOutput]:
        """Read the step's tokens and append them. A sequence that finished meanwhile (it stopped while this step
        was launched ahead, or was aborted) drops its token."""
        tokens, logprobs = launched.results()
        for seq, _ in launched.scheduled:
            if seq.status != Status.FINISHED:
                self.blocks.commit(seq)
        outputs = []
        for i, (seq, token) in enumerate(zip(launched.to_sample, tokens, strict=True)):
            if seq.status == Status.FINISHED:
                continue
            try:
                outputs.append(self._append(seq, token, None if logprobs is None else logprobs[i]))
            except Exception as e:  # this row's own output processing (detokenizer, stop strings): it fails alone
                outputs.append(self.fail(seq, e))
        self._drop_stale_inflight()
        return outputs

    def _drop_stale_inflight(self) -> None:
        # A step launched ahead whose sequences have all finished: its work is queued on the device before anything
        # launched later, so nothing needs it read.
        if self.inflight is not None and self.inflight.stale:
            self.inflight = None

    def _append(self, seq: Sequence, token: int, logprobs: RowLogprobs | None) -> RequestOutput:
        seq.token_ids.append(token)
        seq.metrics.setdefault("first_token", time.monotonic())
        if seq.logprobs is not None:
            seq.logprobs.append(self._logprob(token, logprobs, seq.params.logprobs))
        finish = None
        new_text = ""
        # A stop token ends the output as EOS does: kept in token_ids, not in the text.
        if (token in self.eos_token_ids and not seq.params.ignore_eos) or token in seq.params.stop_token_ids:
            finish = "stop"
        else:
            new_text = seq.stops.push(seq.detok.add(token))
            if seq.stops.stopped:
                finish = "stop"
            elif len(seq.output_ids) >= seq.max_output_tokens:
                finish = "length"
        if finish is not None:
            new_text += seq.stops.flush()
            self._retire(seq, finish)
            self.seqs.pop(seq.request_id, None)
            seq.metrics["finished"] = time.monotonic()
        return self._output(seq, new_text)

    def fail(self, seq: Sequence, error: Exception) -> RequestOutput:
        """Retire a request that failed; its last output carries the error."""
        self._retire(seq, "error")
        self.seqs.pop(seq.request_id, None)
        out = self._output(seq, "")
        out.error = error
        return out

    def _retire(self, seq: Sequence, reason: str) -> None:
        self.scheduler.finish(seq, reason)
        self.sampler.release(seq)

    def _logprob(self, token: int, row: RowLogprobs, top_n: int) -> TokenLogprob:
        decode = self.tokenizer.decode
        chosen, top = row
        return TokenLogprob(token, decode([token]), chosen, [(i, decode([i]), v) for i, v in top[:top_n]])

    def _output(self, seq: Sequence, new_text: str) -> RequestOutput:
        return RequestOutput(
            request_id=seq.request_id, prompt_token_ids=seq.prompt_ids, text=seq.stops.text[: seq.stops.emitted],
            token_ids=seq.output_ids, finished=seq.is_finished, finish_reason=seq.finish_reason,
            logprobs=list(seq.logprobs) if seq.logprobs is not None else None, new_text=new_text,
            metrics=dict(seq.metrics),
        )
