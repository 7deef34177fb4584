"""POST /v1/chat/completions: a conversation through the model's chat template."""

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


class ChatReply(Reply):
    object = "chat.completion.chunk"

    def __init__(self, rid: str, created: int, model: str, num_prompt_tokens: int, include_usage: bool,
                 want_logprobs: bool):
        super().__init__(rid, created, model, num_prompt_tokens, include_usage)
        self.want_logprobs = want_logprobs
        self.started, self.sent_logprobs = False, 0

    def response(self, out: RequestOutput) -> dict[str, Any]:
        return p.chat_response(self.rid, self.created, self.model, out, self.want_logprobs)

    def _delta(self, delta: dict[str, Any], finish_reason: str | None, lps: dict[str, Any] | None) -> dict[str, Any]:
        return self.chunk([{"index": 0, "delta": delta, "logprobs": lps, "finish_reason": finish_reason}])

    def chunks(self, out: RequestOutput) -> list[dict[str, Any]]:
        cs = []
        if not self.started:
            self.started = True
            cs.append(self._delta({"role": "assistant", "content": ""}, None, None))
        lps = None
        if self.want_logprobs and out.logprobs is not None and len(out.logprobs) > self.sent_logprobs:
            lps = p.chat_logprobs(out.logprobs[self.sent_logprobs :])
            self.sent_logprobs = len(out.logprobs)
        if out.new_text or lps:
            cs.append(self._delta({"content": out.new_text}, None, lps))
        if out.finished:
            cs.append(self._delta({}, out.finish_reason, None))
        return cs


def _prepare(server: ServerState, raw: bytes) -> tuple[p.ChatCompletionRequest, list[int], SamplingParams, int]:
    # On a worker thread (ServerState.prepare): the chat template and the tokenizer take time in the prompt's size.
    body = server.parse(raw, p.ChatCompletionRequest)
    try:
        ids = server.engine.encode_chat(body.chat_messages())
    except LongseqError as e:
        raise p.ApiError(str(e), param="messages") from e
    # Without max_tokens the output may fill what the prompt leaves of the context, as in OpenAI's API.
    max_output = server.check_request(ids, body.max_output_tokens, "messages", prompt_alone=True)
    params = body.sampling_params(max_output)
    server.check_sampling(params)
    return body, ids, params, max_output


@router.post("/v1/chat/completions", dependencies=[Depends(check_key)])
@guarded
async def chat_completions(request: Request, server: Server) -> Response:
    arrival = time.monotonic()
    body, ids, params, max_output = await server.prepare(request, functools.partial(_prepare, server))
    rid = p.new_id("chatcmpl")
    reply = ChatReply(rid, p.now(), server.reply_model(body.model), len(ids), body.include_usage, bool(body.logprobs))
    gen = Generation(server.engine, rid, ids, params, max_output, server.metrics, arrival, server.lora_for(body.model))
    return await respond(request, gen, bool(body.stream), reply)
