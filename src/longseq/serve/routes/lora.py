"""POST /v1/load_lora_adapter and /v1/unload_lora_adapter: LoRA adapters registered and removed at run time, in
vLLM's request shapes ({"lora_name": ..., "lora_path": ...}) and with its plain-text success answers. A loaded
adapter is listed by /v1/models and selected by a request's `model`; an adapter that cannot be served is refused
with a 400 naming the reason, and the server goes on serving."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, ConfigDict, ValidationError

from longseq.engine.lora import UnknownLoRAError
from longseq.serve import protocol as p
from longseq.serve.body import parse_json, read_body
from longseq.serve.errors import guarded
from longseq.serve.state import Server, ServerState, check_key

router = APIRouter()


class LoadLoRARequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    lora_name: str
    lora_path: str


class UnloadLoRARequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    lora_name: str
    lora_int_id: int | None = None  # vLLM's; names are what longseq goes by


async def _body(request: Request, server: ServerState, schema: type[BaseModel]) -> BaseModel:
    data = parse_json(await read_body(request, server.max_request_bytes))
    try:
        return schema.model_validate(data, strict=True)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(x) for x in first["loc"])
        raise p.ApiError(f"{where}: {first['msg']}", param=where or None) from e


@router.post("/v1/load_lora_adapter", dependencies=[Depends(check_key)])
@guarded
async def load_lora_adapter(request: Request, server: Server) -> PlainTextResponse:
    body = await _body(request, server, LoadLoRARequest)
    name = body.lora_name
    if name in server.accepted_models:
        raise p.ApiError(f"'{name}' is the base model's name; give the adapter another", param="lora_name")
    if name in server.engine.lora_adapters():
        raise p.ApiError(f"the LoRA adapter '{name}' has already been loaded", param="lora_name")
    await server.engine.load_lora(name, body.lora_path)  # a LoRAError (a LongseqError) answers 400
    return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")


@router.post("/v1/unload_lora_adapter", dependencies=[Depends(check_key)])
@guarded
async def unload_lora_adapter(request: Request, server: Server) -> PlainTextResponse:
    body = await _body(request, server, UnloadLoRARequest)
    try:
        await server.engine.unload_lora(body.lora_name)
    except UnknownLoRAError:
        raise p.ApiError(f"the LoRA adapter '{body.lora_name}' cannot be found", 404, param="lora_name",
                         code="model_not_found") from None
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")
