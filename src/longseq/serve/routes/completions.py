"""POST /v1/completions: plain completion of one prompt, text or token ids."""

from __future__ import annotations

import functools
import time
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from longseq.engine.outputs import RequestOutput
from longseq.errors import LongseqError
from longseq.generation.sampling import SamplingParams
from longseq.serve import protocol as p
from longseq.serve.errors import guarded
from longseq.serve.generation import Generation
from longseq.serve.state import Server, ServerState, check_key
from longseq.serve.streaming import Reply, respond

router = APIRouter()


class CompletionReply(Reply):
    object = "text_completion"

    def __init__(self, rid: str, created: int, model: str, num_prompt_tokens: int, include_usage: bool,
                 want_logprobs: bool):
        super().__init__(rid, created, model, num_prompt_tokens, include_usage)
        self.want_logprobs = want_logprobs
        self.sent_chars = self.sent_logprobs = 0

    def response(self, out: RequestOutput) -> dict[str, Any]:
        return p.completion_response(self.rid, self.created, self.model, out, self.want_logprobs)

    def chunks(self, out: RequestOutput) -> list[dict[str, Any]]:
        lps = None
        if self.want_logprobs and out.logprobs is not None:
            lps = p.completion_logprobs(out.logprobs[self.sent_logprobs :], self.sent_chars)
            self.sent_logprobs = len(out.logprobs)
        if not (out.new_text or out.finished or (lps and lps["tokens"])):
            return []
        self.sent_chars += len(out.new_text)
        return [self.chunk([{"index": 0, "text": out.new_text, "logprobs": lps, "finish_reason": out.finish_reason}])]


def _prepare(server: ServerState, raw: bytes) -> tuple[p.CompletionRequest, list[int], SamplingParams, int]:
    # On a worker thread (ServerState.prepare): the tokenizer takes time in the prompt's size.
    body = server.parse(raw, p.CompletionRequest)
    prompt = body.single_prompt()
    if isinstance(prompt, str):
        try:
            ids = server.engine.encode(prompt)
        except LongseqError as e:
            raise p.ApiError(str(e), param="prompt") from e
    else:
        ids = list(prompt)  # the check below keeps them inside the vocabulary
    params = body.sampling_params()
    max_output = server.check_request(ids, params.max_new_tokens, "prompt")
    server.check_sampling(params)
    return body, ids, params, max_output


@router.post("/v1/completions", dependencies=[Depends(check_key)])
@guarded
async def completions(request: Request, server: Server) -> Response:
    arrival = time.monotonic()
    body, ids, params, max_output = await server.prepare(request, functools.partial(_prepare, server))
    rid = p.new_id("cmpl")
    reply = CompletionReply(rid, p.now(), server.reply_model(body.model), len(ids), body.include_usage,
                            body.logprobs is not None)
    gen = Generation(server.engine, rid, ids, params, max_output, server.metrics, arrival, server.lora_for(body.model))
    return await respond(request, gen, bool(body.stream), reply)
